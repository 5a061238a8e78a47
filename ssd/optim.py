"""The reference's optimizer and learning-rate schedule (reference-semantics section 8).

RMSProp as PaddlePaddle Fluid defines it, with the L2 regularisation added to the gradient first:

    g = grad + l2 * w;   r = rho * r + (1 - rho) * g^2;   w -= lr * multiplier * g / sqrt(r + epsilon)

rho 0.95, epsilon 1e-6 inside the square root, no momentum, not centred, ``r`` starting at 0. (PyTorch's
``torch.optim.RMSprop`` adds epsilon outside the square root, which moves small-gradient steps a lot.)
The learning rate is piecewise constant in epochs; each parameter group carries its multiplier
(``MobileNetSSD.lr_multipliers``: 0.1 for the body's and extra blocks' conv weights).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .model import BODY_CONV_LR_MULTIPLIER

RHO = 0.95
EPSILON = 1e-6
L2_DECAY = 5e-5


class ReferenceRMSProp(torch.optim.Optimizer):
    """RMSProp with epsilon inside the square root and L2 decay added to the gradient (see above).

    Each group's effective rate is ``lr * lr_multiplier`` (``lr_multiplier`` defaults to 1)."""

    def __init__(self, params, lr: float, rho: float = RHO, epsilon: float = EPSILON, weight_decay: float = L2_DECAY):
        if lr <= 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        if not 0.0 <= rho < 1.0:
            raise ValueError(f"rho must be in [0, 1), got {rho}")
        super().__init__(params, {"lr": lr, "rho": rho, "epsilon": epsilon, "weight_decay": weight_decay,
                                  "lr_multiplier": 1.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("ReferenceRMSProp does not support sparse gradients")
            squares = []
            for p in params:
                state = self.state[p]
                if "mean_square" not in state:
                    state["mean_square"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                squares.append(state["mean_square"])
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            torch._foreach_mul_(squares, group["rho"])
            torch._foreach_addcmul_(squares, grads, grads, value=1.0 - group["rho"])
            denominators = torch._foreach_add(squares, group["epsilon"])
            torch._foreach_sqrt_(denominators)
            torch._foreach_addcdiv_(params, grads, denominators, value=-group["lr"] * group["lr_multiplier"])
        return loss


def parameter_groups(model: torch.nn.Module, body_multiplier: float = BODY_CONV_LR_MULTIPLIER) -> list[dict]:
    """One group per learning-rate multiplier (``model.lr_multipliers(body_multiplier)``), in parameter order."""
    multipliers = model.lr_multipliers(body_multiplier)
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault(multipliers[name], []).append(param)
    return [{"params": params, "lr_multiplier": m} for m, params in groups.items()]


def make_optimizer(model: torch.nn.Module, lr: float, body_multiplier: float = BODY_CONV_LR_MULTIPLIER) -> ReferenceRMSProp:
    return ReferenceRMSProp(parameter_groups(model, body_multiplier), lr=lr)


def learning_rate(base: float, boundaries: Sequence[int], rates: Sequence[float], epoch: int) -> float:
    """Piecewise constant: ``base`` times the rate of the last boundary (in epochs) reached."""
    passed = sum(1 for boundary in boundaries if epoch >= boundary)
    return base * rates[passed]


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
