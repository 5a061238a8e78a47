"""csrc/cuda/fake_quant.cu on the emulator against the CPU kernels, bit for bit, under several thread
orders and SM counts (the grids, and so the reductions' partitioning, depend on the SM count): outputs,
scales, clip-STE masks and output strides, on contiguous and strided inputs (read in place when dense),
on both sides of the one-launch size limit, with the number of launches each op makes."""
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
            assert_same(emu.fake_quant_abs_max(t, bits, True), cpu.fake_quant_abs_max(t, bits, True),
                        "fake_quant_abs_max with mask bits=%d" % bits)
        for s in (torch.tensor(1.7), torch.tensor(0.0), torch.tensor([0.3])):
            assert_same(emu.fake_quant_with_scale(t, s, 8, True), cpu.fake_quant_with_scale(t, s, 8, True),
                        "fake_quant_with_scale")
            assert_same(emu.quantize_with_scale(t, s, 8), cpu.quantize_with_scale(t, s, 8), "quantize_with_scale")
            g = sample(t.shape, dtype, 2, specials=False)
            assert_same(emu.fake_quant_clip_grad(g, t, s), cpu.fake_quant_clip_grad(g, t, s), "fake_quant_clip_grad")
            out, mask = cpu.fake_quant_with_scale(t, s, 8, True)
            g = torch.empty_like(out).copy_(g)  # the mask follows the output's memory order
            assert_same(emu.fake_quant_mask_grad(g, mask), cpu.fake_quant_mask_grad(g, mask), "fake_quant_mask_grad")


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
                 lambda ops: ops.quantize_with_scale(x, torch.tensor([1.0, 2.0]), 8),
                 lambda ops: ops.fake_quant_mask_grad(x, torch.zeros(2, dtype=torch.int32)),
                 lambda ops: ops.fake_quant_mask_grad(x, torch.zeros(1))):
        with pytest.raises(RuntimeError) as cpu_err:
            call(cpu)
        with pytest.raises(RuntimeError) as emu_err:
            call(emu)
        assert str(cpu_err.value).split("\n")[0] == str(emu_err.value).split("\n")[0]


# --- strided inputs, the multi-launch path, launch counts --------------------------------------------

def strided_views(dtype, seed):
    """Dense layouts the kernels read where they lie (the output takes their strides), and a non-dense
    view they copy first."""
    base = sample((2, 6, 5, 7), dtype, seed)
    flat = sample((301,), dtype, seed + 1)
    return {
        "channels_last": base.contiguous(memory_format=torch.channels_last),
        "transposed_weight": sample((9, 13), dtype, seed + 2).t(),
        "permuted": base.permute(3, 1, 0, 2),
        "offset_by_one": flat[1:],  # dense, but not 16-byte aligned
        "offset_by_three": flat[3:-2],
        "not_dense": base[:, ::2],
    }


def assert_same_layout(gpu, cpu, what):
    gpu, cpu = (gpu, cpu) if isinstance(cpu, (tuple, list)) else ((gpu,), (cpu,))
    for i, (g, c) in enumerate(zip(gpu, cpu)):
        assert g.stride() == c.stride(), "%s[%d]: strides %s vs %s" % (what, i, g.stride(), c.stride())


def both(emu, what, call):
    """call(ops) on the emulated CUDA kernels and on the CPU kernels: same bits, same strides."""
    got, want = call(emu), call(cpu)
    assert_same(got, want, what)
    assert_same_layout(got, want, what)
    return want


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("view", ["channels_last", "transposed_weight", "permuted", "offset_by_one", "offset_by_three",
                                  "not_dense"])
def test_strided_inputs(emu, emu_setting, dtype, view):
    t = strided_views(dtype, 5)[view]
    s = torch.tensor(1.1)
    both(emu, "abs_max", lambda ops: ops.abs_max(t))
    both(emu, "fake_quant_abs_max", lambda ops: ops.fake_quant_abs_max(t, 8, True))
    both(emu, "quantize_abs_max", lambda ops: ops.quantize_abs_max(t, 8))
    _, mask = both(emu, "fake_quant_with_scale", lambda ops: ops.fake_quant_with_scale(t, s, 5, True))
    both(emu, "quantize_with_scale", lambda ops: ops.quantize_with_scale(t, s, 12))
    g = sample(t.shape, dtype, 6, specials=False)  # contiguous: a different layout from t's
    both(emu, "fake_quant_clip_grad", lambda ops: ops.fake_quant_clip_grad(g, t, s))
    out_like = cpu.fake_quant_with_scale(t, s, 5, False)[0]
    g = torch.empty_strided(t.shape, out_like.stride(), dtype=dtype).copy_(g)
    both(emu, "fake_quant_mask_grad", lambda ops: ops.fake_quant_mask_grad(g, mask))
    for axis in range(t.dim()):
        both(emu, "fake channel-wise axis=%d" % axis, lambda ops: ops.fake_channel_wise_quant_abs_max(t, 8, axis, False))
        both(emu, "channel-wise codes axis=%d" % axis, lambda ops: ops.quantize_channel_wise_abs_max(t, 4, axis))


# Above the one-launch limit (32768 elements): per-tensor (flat, and not 16-byte aligned), channel-wise
# with one channel per row (a linear weight along axis 0), per column (channels_last along C; the last
# axis of short rows).
LARGE = {
    "flat": lambda dtype: sample((40_003,), dtype, 7),
    "flat_offset": lambda dtype: sample((40_004,), dtype, 8)[1:],
    "rows": lambda dtype: sample((40, 1_100), dtype, 9),
    "channels_last": lambda dtype: sample((2, 24, 30, 30), dtype, 10).contiguous(memory_format=torch.channels_last),
    "short_rows": lambda dtype: sample((400, 3, 37), dtype, 11),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_launch_path(emu, emu_setting, dtype):
    s = torch.tensor(2.0)
    for case, make in LARGE.items():
        t = make(dtype)
        if t.dim() == 1:
            both(emu, case + " abs_max", lambda ops: ops.abs_max(t))
            _, _, mask = both(emu, case + " fake_quant_abs_max", lambda ops: ops.fake_quant_abs_max(t, 8, True))
            both(emu, case + " quantize_abs_max", lambda ops: ops.quantize_abs_max(t, 16))
            both(emu, case + " fake_quant_with_scale", lambda ops: ops.fake_quant_with_scale(t, s, 8, True))
            g = sample(t.shape, dtype, 12, specials=False)
            both(emu, case + " fake_quant_clip_grad", lambda ops: ops.fake_quant_clip_grad(g, t, s))
            both(emu, case + " fake_quant_mask_grad", lambda ops: ops.fake_quant_mask_grad(g, mask))
            states = [[torch.tensor([0.5]), torch.zeros(3), torch.zeros(1, dtype=torch.long)] for _ in range(2)]
            emu.range_abs_max_update_(t, *states[0], 3)
            cpu.range_abs_max_update_(t, *states[1], 3)
            assert_same(states[0], states[1], case + " range_abs_max")
            states = [[torch.tensor([0.5]), torch.ones(1), torch.ones(1)] for _ in range(2)]
            emu.moving_average_abs_max_update_(t, *states[0], 0.9)
            cpu.moving_average_abs_max_update_(t, *states[1], 0.9)
            assert_same(states[0], states[1], case + " moving_average")
        else:
            axis = 1 if case == "channels_last" else (0 if case == "rows" else -1)
            both(emu, case + " channel-wise", lambda ops: ops.fake_channel_wise_quant_abs_max(t, 8, axis, False))
            both(emu, case + " channel-wise codes", lambda ops: ops.quantize_channel_wise_abs_max(t, 8, axis))


def launches(emu, call):
    emu.emu_reset()
    call()
    return [line.split("<")[0].split(" ")[0] for line in emu.emu_launch_log()]


def test_launch_counts(emu):
    # One launch per op up to 32768 elements (a single block does the reduction and what depends on it),
    # two above (per-block partial maxima, then a pass that finishes them); channel-wise also zeroes its
    # scales with a memset, which is not a kernel launch.
    small, large = torch.randn(5, 999), torch.randn(40, 1_100)
    s, g = torch.tensor(1.0), torch.randn(40, 1_100)
    mask = cpu.fake_quant_with_scale(large, s, 8, True)[1]
    rng = lambda: (torch.tensor([0.5]), torch.zeros(3), torch.zeros(1, dtype=torch.long))  # noqa: E731
    mov = lambda: (torch.tensor([0.5]), torch.ones(1), torch.ones(1))  # noqa: E731
    expected = {
        "abs_max": (lambda x: emu.abs_max(x), ["abs_max_partial_kernel"],
                    ["abs_max_partial_kernel", "abs_max_finish_kernel"]),
        "fake_quant_abs_max": (lambda x: emu.fake_quant_abs_max(x, 8, True), ["abs_max_quantize_small_kernel"],
                               ["abs_max_partial_kernel", "quantize_kernel"]),
        "quantize_abs_max": (lambda x: emu.quantize_abs_max(x, 8), ["abs_max_quantize_small_kernel"],
                             ["abs_max_partial_kernel", "quantize_kernel"]),
        "fake_quant_with_scale": (lambda x: emu.fake_quant_with_scale(x, s, 8, True), ["quantize_kernel"],
                                  ["quantize_kernel"]),
        "channel-wise": (lambda x: emu.fake_channel_wise_quant_abs_max(x, 8, 0, False), ["channel_small_kernel"],
                         ["channel_abs_max_kernel", "channel_quantize_kernel"]),
        "range_abs_max": (lambda x: emu.range_abs_max_update_(x, *rng(), 3), ["range_abs_max_update_kernel"],
                          ["abs_max_partial_kernel", "range_abs_max_update_kernel"]),
        "moving_average": (lambda x: emu.moving_average_abs_max_update_(x, *mov(), 0.9),
                           ["moving_average_update_kernel"], ["abs_max_partial_kernel", "moving_average_update_kernel"]),
        "clip_grad": (lambda x: emu.fake_quant_clip_grad(torch.ones_like(x), x, s), ["clip_grad_kernel"],
                      ["clip_grad_kernel"]),
    }
    for what, (call, want_small, want_large) in expected.items():
        assert launches(emu, lambda: call(small)) == want_small, what
        assert launches(emu, lambda: call(large)) == want_large, what
    assert launches(emu, lambda: emu.fake_quant_mask_grad(g, mask)) == ["mask_grad_kernel"]
    assert launches(emu, lambda: emu.fake_quant_abs_max(torch.empty(0), 8, False)) == []  # a memset only
