"""Quantizer modules (qkernels.nn.quantizers): state against the references, train/eval, state_dict, errors."""
import os
import socket

import pytest
import torch

import qkernels
from qkernels import reference as ref
from qkernels.nn import (FakeQuantAbsMax, FakeQuantMovingAverageAbsMax, FakeQuantRangeAbsMax, FakeQuantWeight,
                         make_activation_quantizer, set_quantization_enabled)


def batches(magnitudes, shape=(3, 5), seed=0):
    """One batch per magnitude whose abs max is exactly that magnitude."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for m in magnitudes:
        x = torch.rand(shape, generator=gen) * 2 - 1
        x = x / x.abs().max() * m
        out.append(x)
    return out


# Steps that make the window wrap several times and evict the maximum (the 9.0 at step 2, the 7.0 later),
# plus batches below the initial scale 0.001.
MAGNITUDES = [0.0005, 0.3, 9.0, 1.0, 2.0, 0.5, 0.25, 7.0, 0.1, 0.2, 0.3, 0.05, 0.04, 3.0, 0.0, 1.5, 0.7, 0.6, 0.2]


def expected_fake_quant(x, scale, bits=8):
    return ref.fake_quant(x, torch.tensor(scale, dtype=torch.float64), bits).float()


@pytest.mark.parametrize("window_size", [1, 4, 7])
def test_range_abs_max_state_follows_reference(window_size):
    q = FakeQuantRangeAbsMax(bits=8, window_size=window_size).train()
    reference = ref.RangeAbsMaxReference(window_size)
    assert float(q.scale) == pytest.approx(0.001) and int(q.step) == 0 and q.window.shape == (window_size,)
    for i, x in enumerate(batches(MAGNITUDES)):
        out = q(x)
        want = reference.update(x)
        assert float(q.scale) == pytest.approx(want, rel=1e-6), "step %d" % i
        assert int(q.step) == i + 1
        # the current batch is quantized with the updated scale
        torch.testing.assert_close(out, expected_fake_quant(x, want), atol=1e-6, rtol=1e-6)


def test_moving_average_state_follows_reference():
    q = FakeQuantMovingAverageAbsMax(bits=8, moving_rate=0.8).train()
    reference = ref.MovingAverageAbsMaxReference(0.8)
    assert float(q.accum) == 1.0 and float(q.state) == 1.0 and float(q.scale) == pytest.approx(0.001)
    for i, x in enumerate(batches(MAGNITUDES * 3)):
        out = q(x)
        want = reference.update(x)
        assert float(q.scale) == pytest.approx(want, rel=1e-5), "step %d" % i
        assert float(q.accum) == pytest.approx(reference.accum, rel=1e-5)
        assert float(q.state) == pytest.approx(reference.state, rel=1e-5)
        torch.testing.assert_close(out, expected_fake_quant(x, float(q.scale)), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bits", [8, 4])
def test_abs_max_is_dynamic_in_train_and_eval(bits):
    q = FakeQuantAbsMax(bits=bits)
    for mode in (True, False):
        q.train(mode)
        for x in batches([0.5, 3.0, 0.01]):
            want, _ = ref.fake_quant_abs_max(x, bits)
            torch.testing.assert_close(q(x), want.float(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("cls", [FakeQuantRangeAbsMax, FakeQuantMovingAverageAbsMax])
def test_eval_freezes_static_state(cls):
    q = cls(bits=8).train()
    for x in batches([1.0, 2.0, 0.5]):
        q(x)
    q.eval()
    frozen = {k: v.clone() for k, v in q.state_dict().items()}
    big = batches([50.0])[0]
    out = q(big)
    for k, v in q.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    # clipped to the frozen scale
    torch.testing.assert_close(out, expected_fake_quant(big, float(frozen["scale"])), atol=1e-6, rtol=1e-6)
    assert out.abs().max() <= float(frozen["scale"]) + 1e-6


@pytest.mark.parametrize("kind", ["range_abs_max", "moving_average_abs_max", "abs_max"])
def test_state_dict_round_trip(kind):
    q = make_activation_quantizer(kind, bits=8, window_size=5).train()
    for x in batches([1.0, 4.0, 0.5, 0.25, 2.0, 0.1, 0.3]):
        q(x)
    state = q.state_dict()
    expected_keys = {"abs_max": {"scale"}, "range_abs_max": {"scale", "window", "step"},
                     "moving_average_abs_max": {"scale", "accum", "state"}}[kind]
    assert set(state) == expected_keys
    fresh = make_activation_quantizer(kind, bits=8, window_size=5)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    q.eval(), fresh.eval()
    x = batches([3.0])[0]
    assert torch.equal(q(x), fresh(x))
    # training continues identically from the loaded state
    q.train(), fresh.train()
    for x in batches([0.7, 8.0, 0.2], seed=3):
        assert torch.equal(q(x), fresh(x))
    assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), fresh.state_dict().values()))


def test_missing_state_keeps_initial_values_but_partial_state_is_an_error():
    q = FakeQuantRangeAbsMax(window_size=3)
    q.load_state_dict({})  # a float checkpoint: no quantizer state at all
    assert float(q.scale) == pytest.approx(0.001)
    with pytest.raises(RuntimeError, match="Missing key"):
        q.load_state_dict({"scale": torch.tensor(2.0)})


def test_disabled_quantizer_is_identity_and_keeps_state():
    q = FakeQuantRangeAbsMax(window_size=3).train()
    set_quantization_enabled(q, False)
    x = batches([5.0])[0]
    assert q(x) is x
    assert int(q.step) == 0 and float(q.scale) == pytest.approx(0.001)
    set_quantization_enabled(q, True)
    q(x)
    assert int(q.step) == 1


def test_straight_through_gradients():
    x = torch.linspace(-3, 3, 13, requires_grad=True)
    q = FakeQuantRangeAbsMax(window_size=2).eval()
    q.scale.fill_(1.0)
    q(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # reference: gradient passes unchanged
    x.grad = None
    q_clip = FakeQuantRangeAbsMax(window_size=2, ste="clip").eval()
    q_clip.scale.fill_(1.0)
    q_clip(x).sum().backward()
    assert torch.equal(x.grad, (x.detach().abs() <= 1.0).float())
    # clip STE with a module used twice in one training step: the in-place update must not break backward
    q_clip.train()
    y = torch.randn(4, requires_grad=True)
    (q_clip(y) + q_clip(2 * y)).sum().backward()
    assert y.grad is not None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype):
    for kind in ("abs_max", "range_abs_max", "moving_average_abs_max"):
        q = make_activation_quantizer(kind).train()
        x = batches([2.0])[0].to(dtype)
        out = q(x)
        assert out.dtype == dtype and q.scale.dtype == torch.float32
        torch.testing.assert_close(out.float(), expected_fake_quant(x.float(), float(q.scale)), atol=2e-2, rtol=1e-2)


def test_weight_quantizers_match_reference():
    w = torch.randn(6, 3, 3, 3)
    per_tensor = FakeQuantWeight(8, "abs_max")
    torch.testing.assert_close(per_tensor(w), ref.fake_quant_abs_max(w)[0].float(), atol=1e-6, rtol=1e-6)
    channel = FakeQuantWeight(8, "channel_wise_abs_max", axis=0)
    torch.testing.assert_close(channel(w), ref.fake_channel_wise_quant_abs_max(w, 8, 0)[0].float(), atol=1e-6, rtol=1e-6)
    codes, scales = channel.quantize(w)
    assert codes.dtype == torch.int8 and scales.shape == (6,)
    torch.testing.assert_close(scales, w.abs().amax(dim=(1, 2, 3)))
    codes, scale = per_tensor.quantize(w)
    assert scale.dim() == 0 and codes.abs().max() == 127


def test_per_channel_beats_per_tensor_on_unequal_channels():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(8, 16, generator=gen) * torch.logspace(-3, 0, 8).unsqueeze(1)  # channels 1000x apart

    def worst_channel_relative_error(quantizer):
        return ((quantizer(w) - w).norm(dim=1) / w.norm(dim=1)).max()

    err_tensor = worst_channel_relative_error(FakeQuantWeight(8, "abs_max"))
    err_channel = worst_channel_relative_error(FakeQuantWeight(8, "channel_wise_abs_max"))
    assert err_tensor > 0.5  # the small channels are rounded away
    assert err_channel < 0.01


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="bits"):
        FakeQuantAbsMax(bits=1)
    with pytest.raises(ValueError, match="bits"):
        FakeQuantRangeAbsMax(bits=17)
    with pytest.raises(ValueError, match="ste"):
        FakeQuantMovingAverageAbsMax(ste="mask")
    with pytest.raises(ValueError, match="window_size"):
        FakeQuantRangeAbsMax(window_size=0)
    with pytest.raises(ValueError, match="moving_rate"):
        FakeQuantMovingAverageAbsMax(moving_rate=1.5)
    with pytest.raises(ValueError, match="activation_quantize_type"):
        make_activation_quantizer("max")
    with pytest.raises(ValueError, match="weight_quantize_type"):
        FakeQuantWeight(8, "channel_wise")


# --- several processes: the state must be the same on every rank --------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank, world, port, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        range_q = FakeQuantRangeAbsMax(window_size=3).train()
        avg_q = FakeQuantMovingAverageAbsMax().train()
        for step in range(5):
            # every rank sees different data; rank 1's batches are larger on odd steps
            x = batches([1.0 + step + (3.0 if (rank + step) % 2 else 0.0)], seed=10 * step + rank)[0]
            range_q(x), avg_q(x)
        torch.save({"range": range_q.state_dict(), "avg": avg_q.state_dict()}, "%s.%d" % (result_path, rank))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_state_is_consistent_across_ranks(tmp_path):
    path = str(tmp_path / "state")
    torch.multiprocessing.spawn(_distributed_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    states = [torch.load("%s.%d" % (path, r)) for r in range(2)]
    for kind in ("range", "avg"):
        for key in states[0][kind]:
            assert torch.equal(states[0][kind][key], states[1][kind][key]), (kind, key)
    # and equal to one process that sees the per-step max over both ranks
    reference = ref.RangeAbsMaxReference(3)
    for step in range(5):
        reference.update(torch.tensor([1.0 + step + 3.0]))
    assert float(states[0]["range"]["scale"]) == pytest.approx(reference.scale)
