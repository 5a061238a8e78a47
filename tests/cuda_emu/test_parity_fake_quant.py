"""csrc/cuda/fake_quant.cu on the emulator against the CPU kernels, bit for bit, under several thread
orders and SM counts (the grids, and so the reductions' partitioning, depend on the SM count)."""
import pytest
import torch

from .parity import assert_same

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(0,), (1,), (257,), (3, 5, 7, 11), (2, 1, 4099)]
NAN, INF = float("nan"), float("inf")
cpu = torch.ops.qkernels


def sample(shape, dtype, seed, specials=True):
    """Normal values with NaN, +-Inf, -0.0 and exact ties sprinkled in (the CPU and CUDA kernels must agree
    on every one of them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    if specials and x.numel() >= 8:
        flat = x.view(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:8]
        flat[idx] = torch.tensor([NAN, INF, -INF, -0.0, 0.0, 2.5, -2.5, 1e-30])
    return x.to(dtype)


def non_contiguous(x):
    return x.transpose(0, -1) if x.dim() > 1 else x[::2]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_per_tensor_ops(emu, emu_setting, dtype, shape):
    x = sample(shape, dtype, 1)
    for t in (x, non_contiguous(x)):
        assert_same(emu.abs_max(t), cpu.abs_max(t), "abs_max")
        for bits in (8, 4, 12):
            assert_same(emu.fake_quant_abs_max(t, bits, False), cpu.fake_quant_abs_max(t, bits, False),
                        "fake_quant_abs_max bits=%d" % bits)
            assert_same(emu.quantize_abs_max(t, bits), cpu.quantize_abs_max(t, bits), "quantize_abs_max bits=%d" % bits)
        for s in (torch.tensor(1.7), torch.tensor(0.0), torch.tensor([0.3])):
            assert_same(emu.fake_quant_with_scale(t, s, 8, True), cpu.fake_quant_with_scale(t, s, 8, True),
                        "fake_quant_with_scale")
            assert_same(emu.quantize_with_scale(t, s, 8), cpu.quantize_with_scale(t, s, 8), "quantize_with_scale")
            g = sample(t.shape, dtype, 2, specials=False)
            assert_same(emu.fake_quant_clip_grad(g, t, s), cpu.fake_quant_clip_grad(g, t, s), "fake_quant_clip_grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 70), (40, 1), (2, 0, 3), (6,)], ids=str)
def test_channel_wise_ops_on_every_axis(emu, emu_setting, dtype, shape):
    x = sample(shape, dtype, 3)
    for axis in range(-len(shape), len(shape)):
        for bits in (8, 3):
            assert_same(emu.fake_channel_wise_quant_abs_max(x, bits, axis, False),
                        cpu.fake_channel_wise_quant_abs_max(x, bits, axis, False), "fake channel-wise axis=%d" % axis)
            assert_same(emu.quantize_channel_wise_abs_max(x, bits, axis),
                        cpu.quantize_channel_wise_abs_max(x, bits, axis), "channel-wise codes axis=%d" % axis)
    t = non_contiguous(x)
    assert_same(emu.fake_channel_wise_quant_abs_max(t, 8, 0, False), cpu.fake_channel_wise_quant_abs_max(t, 8, 0, False),
                "non-contiguous")


def _step_inputs(n_steps, dtype):
    xs = []
    for i in range(n_steps):
        x = sample((97,), dtype, 100 + i) * (0.2 + (i % 7))  # maxima rise and fall, so the window rescans
        if i % 11 == 5:
            x = torch.zeros(97, dtype=dtype)
        xs.append(x)
    return xs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window_size", [1, 4, 13])
def test_range_abs_max_state_over_many_steps(emu, emu_setting, dtype, window_size):
    states = [[torch.tensor([0.001]), torch.zeros(window_size), torch.zeros(1, dtype=torch.long)] for _ in range(2)]
    for i, x in enumerate(_step_inputs(40, dtype)):
        emu.range_abs_max_update_(x, *states[0], window_size)
        cpu.range_abs_max_update_(x, *states[1], window_size)
        assert_same(states[0], states[1], "step %d" % i)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rate", [0.9, 0.99, 0.3])
def test_moving_average_state_over_many_steps(emu, emu_setting, dtype, rate):
    states = [[torch.tensor([0.001]), torch.ones(1), torch.ones(1)] for _ in range(2)]
    for i, x in enumerate(_step_inputs(60, dtype)):
        emu.moving_average_abs_max_update_(x, *states[0], rate)
        cpu.moving_average_abs_max_update_(x, *states[1], rate)
        assert_same(states[0], states[1], "step %d" % i)


def test_errors_match_the_cpu_kernels(emu):
    x = torch.randn(4, 4)
    for call in (lambda ops: ops.fake_quant_abs_max(x.int(), 8, False),
                 lambda ops: ops.quantize_abs_max(x, 1),
                 lambda ops: ops.fake_channel_wise_quant_abs_max(x, 8, 2, False),
                 lambda ops: ops.quantize_with_scale(x, torch.tensor([1.0, 2.0]), 8)):
        with pytest.raises(RuntimeError) as cpu_err:
            call(cpu)
        with pytest.raises(RuntimeError) as emu_err:
            call(emu)
        assert str(cpu_err.value).split("\n")[0] == str(emu_err.value).split("\n")[0]
