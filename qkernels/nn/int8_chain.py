"""When chained int8 layers may hand each other int8 codes: only inside a call of the model whose graph
said so.

convert_to_int8 decides chaining from the traced graph of the whole model: a layer writes int8 codes
only when every reader of its output is an int8 layer taking them. Called any other way (a slice
``model.features[:5]``, a submodule called on its own, a layer called from new code), that analysis says
nothing, so codes would be taken for floats. The transpiler therefore gives the converted model a
``ChainScope``: hooks on the model's forward mark the scope active for the duration of each call, and a
chained layer writes codes only while its scope is active; otherwise it writes the float values its
codes stand for (its own epilogue without the next layer's scale, and its own activation).
"""


import weakref


class ChainScope:
    """Active while the converted model's forward runs (nesting counted). It also carries, for the duration
    of one call, the abs max a dynamic int8 producer took of its output (``hand_over_abs_max``) to the
    layers reading that very tensor (``handed_abs_max``; any other tensor, even an equal one, gets None)."""

    def __init__(self):
        self.depth = 0
        self._abs_max = {}

    @property
    def active(self) -> bool:
        return self.depth > 0

    def hand_over_abs_max(self, out, abs_max) -> None:
        self._abs_max[id(out)] = (weakref.ref(out), abs_max)

    def handed_abs_max(self, x):
        entry = self._abs_max.get(id(x))
        return entry[1] if entry is not None and entry[0]() is x else None

    def leave(self) -> None:
        self.depth = max(0, self.depth - 1)
        if self.depth == 0:
            self._abs_max.clear()

    def __enter__(self) -> "ChainScope":
        """``with layer.chain_scope: layer(codes)``: call chained layers on their own as the model would."""
        self.depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self.leave()

    def __getstate__(self):
        return {"depth": 0}  # weak references do not pickle; a saved model is not inside a call

    def __setstate__(self, state):
        self.depth = state.get("depth", 0)
        self._abs_max = {}


class _EnterScope:
    def __init__(self, scope: ChainScope):
        self.scope = scope

    def __call__(self, _module, _args):
        self.scope.depth += 1


class _LeaveScope:
    def __init__(self, scope: ChainScope):
        self.scope = scope

    def __call__(self, _module, _args, _output):
        self.scope.leave()


def install_chain_scope(model) -> ChainScope:
    """A ChainScope active during every call of ``model`` (hooks are picklable objects, so the model
    saves whole with torch.save)."""
    scope = ChainScope()
    model.register_forward_pre_hook(_EnterScope(scope))
    model.register_forward_hook(_LeaveScope(scope), always_call=True)
    return scope
