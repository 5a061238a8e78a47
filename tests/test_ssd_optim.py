"""The reference's optimizer (ssd.optim): RMSProp steps against the hand-written update, the per-group
learning-rate multipliers of MobileNetSSD, the piecewise schedule."""
import copy

import pytest
import torch
from torch import nn

from ssd.model import MobileNetSSD
from ssd.optim import ReferenceRMSProp, learning_rate, make_optimizer, parameter_groups, set_learning_rate


def _reference_steps(w, grads, lr, multiplier=1.0, l2=5e-5):
    """The reference's update in float64: g += l2 w; r = 0.95 r + 0.05 g^2; w -= lr g / sqrt(r + 1e-6)."""
    w, r = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    for g in grads:
        g = g.double() + l2 * w
        r = 0.95 * r + 0.05 * g * g
        w = w - lr * multiplier * g / torch.sqrt(r + 1e-6)
    return w


@pytest.mark.parametrize("scale", [1.0, 1e-3])   # 1e-3: gradients where epsilon's place matters
def test_rmsprop_matches_the_hand_written_update(scale):
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, 5, generator=gen)
    grads = [scale * torch.randn(7, 5, generator=gen) for _ in range(4)]
    p = nn.Parameter(w0.clone())
    opt = ReferenceRMSProp([{"params": [p], "lr_multiplier": 0.1}], lr=0.01)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    want = _reference_steps(w0, grads, lr=0.01, multiplier=0.1)
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-6)
    if scale == 1.0:
        return
    # PyTorch's RMSprop (epsilon outside the root) takes other steps when gradients are small
    q = nn.Parameter(w0.clone())
    torch_opt = torch.optim.RMSprop([q], lr=0.001, alpha=0.95, eps=1e-6, weight_decay=5e-5)
    for g in grads:
        q.grad = g.clone()
        torch_opt.step()
    gap = (q.detach().double() - _reference_steps(w0, grads, lr=0.001)).abs().max()
    assert gap > 1e-3     # steps are about lr * 4.5 = 0.0045 each


def test_rmsprop_l2_applies_without_gradient_and_state_round_trips():
    """L2 is added to the gradient (a zero gradient still decays the weight), and a reloaded optimizer
    takes exactly the steps of the original (resume)."""
    p = nn.Parameter(torch.full((3,), 2.0))
    opt = ReferenceRMSProp([p], lr=0.1)
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach().double(), _reference_steps(torch.full((3,), 2.0), [torch.zeros(3)], 0.1))
    q = nn.Parameter(p.detach().clone())
    other = ReferenceRMSProp([q], lr=0.1)
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    for param, optimizer in ((p, opt), (q, other)):
        param.grad = torch.tensor([0.5, -1.0, 0.0])
        optimizer.step()
    assert torch.equal(p, q)


def test_rmsprop_rejects_a_bad_rate():
    with pytest.raises(ValueError, match="learning rate"):
        ReferenceRMSProp([nn.Parameter(torch.zeros(1))], lr=0.0)


def _expected_multiplier(name: str) -> float:
    """The reference's conv_bn convs (stem, 13 separable blocks, 4 extra blocks) at 0.1x; BN and heads 1x.
    In the float model a conv is the first module of its (conv, bn, relu) Sequential."""
    in_body = name.startswith(("body_19.", "body_10.", "extras."))
    return 0.1 if in_body and name.endswith(".0.weight") else 1.0


@pytest.mark.parametrize("quant", [None, "range_abs_max", "fold_bn"])
def test_lr_multipliers_per_parameter_group(quant):
    from qkernels import QuantizeTranspiler

    model = MobileNetSSD(num_classes=6)
    if quant is not None:
        QuantizeTranspiler(activation_quantize_type="range_abs_max", fold_bn=quant == "fold_bn").training_transpile(model)
    multipliers = model.lr_multipliers()
    names = [n for n, _ in model.named_parameters()]
    assert sorted(multipliers) == sorted(names)
    assert {n: _expected_multiplier(n) for n in names} == multipliers
    assert sum(m == 0.1 for m in multipliers.values()) == 1 + 13 * 2 + 4 * 2        # 35 body/extra conv weights
    assert sum(m == 1.0 for m in multipliers.values()) == 35 * 2 + 12 * 2           # BN gamma/beta, head w/b

    optimizer = make_optimizer(model, lr=0.002)
    set_learning_rate(optimizer, 0.004)
    rates = {id(p): g["lr"] * g["lr_multiplier"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert rates[id(param)] == pytest.approx(0.004 * _expected_multiplier(name)), name
    assert len(parameter_groups(model)) == 2
    # --body_lr_multiplier 1 (training from scratch): one rate for everything
    assert set(model.lr_multipliers(body=1.0).values()) == {1.0} and len(parameter_groups(model, 1.0)) == 1


def test_learning_rate_schedule_is_piecewise_in_epochs():
    got = [round(learning_rate(0.01, [2, 4], [1, 0.1, 0.01], e), 8) for e in range(6)]
    assert got == [0.01, 0.01, 0.001, 0.001, 1e-4, 1e-4]
