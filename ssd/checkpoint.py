"""Checkpoints and saved inference models: one format, written atomically, read with ``weights_only``.

A record is a dict of plain types and tensors: ``format``, ``arch``, ``stage`` (float / qat / frozen /
int8), ``quant`` (the transpiler settings, None for float), ``labels``, ``num_classes``, ``model`` (the
state dict); a training checkpoint adds ``optimizer``, ``epoch``, ``history``, ``best``, ``rng`` and
``config``. A bare state dict of a MobileNetSSD reads as a float model. ``build_model`` rebuilds the
module of any stage so that the state dict loads strictly.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .model import MobileNetSSD
from .priors import priors_per_location

ARCH = "MobileNetSSD-v1-300"
FORMAT = "qkernels-ssd/1"
STAGES = ("float", "qat", "frozen", "int8")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model being built."""


def make_transpiler(quant: dict):
    from qkernels.transpiler import QuantizeTranspiler

    return QuantizeTranspiler(activation_quantize_type=quant["act_quant_type"],
                              weight_quantize_type=quant["weight_quant_type"], fold_bn=quant["fold_bn"])


def build_model(num_classes: int, quant: dict | None = None, stage: str = "float") -> torch.nn.Module:
    """The float model, then transpiled / frozen / converted up to ``stage`` (untrained weights)."""
    if stage not in STAGES:
        raise CheckpointError(f"unknown model stage {stage!r}; expected one of {STAGES}")
    model = MobileNetSSD(num_classes=num_classes)
    if stage == "float":
        return model
    if quant is None:
        raise CheckpointError(f"a {stage} model needs its quantization settings")
    transpiler = make_transpiler(quant)
    transpiler.training_transpile(model)
    if stage in ("frozen", "int8"):
        model.eval()
        transpiler.freeze_program(model)
    if stage == "int8":
        transpiler.convert_to_int8(model)
    return model


def load_state_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """load_state_dict that names missing, unexpected and mis-shaped keys in its error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        def names(items):
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys: {names(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys: {names(unexpected)}")
        if shapes:
            parts.append(f"{len(shapes)} keys of another shape (checkpoint vs model): {names(shapes)}")
        raise CheckpointError(f"{source} does not fit the model ({type(model).__name__}, {ARCH}): " + "; ".join(parts))
    model.load_state_dict(state)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A record (see the module docstring) with ``path`` added. Only tensors and plain types are
    unpickled (``weights_only=True``): a file holding code objects is refused, not run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load raises many types for a corrupt or non-tensor file
        raise CheckpointError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0]}") from exc
    if isinstance(data, dict) and data.get("format") == FORMAT:
        if data.get("arch") != ARCH:
            raise CheckpointError(f"checkpoint {path} is for architecture {data.get('arch')!r}, "
                                  f"this command builds {ARCH!r}")
        data["path"] = str(path)
        return data
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        return {"format": FORMAT, "arch": ARCH, "stage": "float", "quant": None, "model": data,
                "num_classes": _classes_in_state(data, path), "labels": None, "path": str(path)}
    raise CheckpointError(f"{path} is neither a qkernels SSD checkpoint nor a state dict")


def _classes_in_state(state: dict, path) -> int:
    head = state.get("conf_heads.0.weight")
    if head is None:
        raise CheckpointError(f"state dict {path} has no 'conf_heads.0.weight': not a MobileNetSSD checkpoint "
                              f"(first keys: {', '.join(list(state)[:4])})")
    return int(head.shape[0]) // priors_per_location()[0]


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    model = build_model(ckpt["num_classes"], ckpt.get("quant"), ckpt["stage"])
    load_state_strict(model, ckpt["model"], f"checkpoint {ckpt.get('path', '')}")
    return model


def model_record(model: torch.nn.Module, stage: str, quant: dict | None, labels: list[str]) -> dict:
    return {"format": FORMAT, "arch": ARCH, "stage": stage, "quant": quant, "labels": list(labels),
            "num_classes": len(labels),
            # int8 layers also save their structure (``_extra_state``, a dict): kept as it is
            "model": {k: v.detach().cpu().contiguous() if isinstance(v, torch.Tensor) else v
                      for k, v in model.state_dict().items()}}


def atomic_write(path: Path, write) -> None:
    """``write(temporary path)``, then rename over ``path``: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
