"""csrc/cuda/conv_int8.cu on the emulator against the CPU kernels, bit for bit: int32 accumulators, the
float epilogue (one fma per element on both devices) and int8 requantization, every activation."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from test_ops_int8 import CONV_CASES  # the CPU tests' cases: every MobileNet-SSD conv kind and more

from .conftest import SETTINGS, SETTING_IDS, apply_setting
from .parity import assert_same

cpu = torch.ops.qkernels

MOBILENET_KINDS = [c for c in CONV_CASES if c[0].split()[0] in ("stem", "dw32", "pw", "extra", "head")][:8]


def _pair(v):
    return list(v) if isinstance(v, tuple) else [v, v]


def _conv_inputs(case, seed):
    name, n, c, h, w, o, k, s, p, d, g = case
    gen = torch.Generator().manual_seed(seed)
    kh, kw = _pair(k)
    x = torch.randint(-128, 128, (n, c, h, w), dtype=torch.int8, generator=gen)
    wt = torch.randint(-128, 128, (o, c // g, kh, kw), dtype=torch.int8, generator=gen)
    scale = torch.rand(o, generator=gen) * 1e-3 + 1e-5
    bias = torch.randn(o, generator=gen)
    return x, wt, scale, bias, (_pair(s), _pair(p), _pair(d), g)


def _epilogues(o):
    """(bias?, scale kind, out dtype, activation): every out dtype and activation once."""
    return [(True, "channel", torch.float32, "relu"), (False, "tensor", torch.float32, "none"),
            (True, "tensor", torch.int8, "relu6"), (False, "channel", torch.int8, "none"),
            (False, "one", torch.int32, "none")]


def _run_conv(ops, x, wt, bias, scale, geometry, out_dtype, act):
    s, p, d, g = geometry
    return ops.conv2d_int8(x, wt, bias, s, p, d, g, scale, out_dtype, act)


def _order_sensitive_epilogues(o):
    """The two output paths whose results could depend on the thread/block order and the SM count: split-K
    CTAs adding int32 partial sums straight into the output, and the last CTA of a tile applying the float
    epilogue to the summed workspace (int8 out). The epilogue arithmetic itself is per element and is
    checked for every out dtype and activation by test_conv2d_int8_every_case."""
    return [(True, "channel", torch.int8, "relu6"), (False, "one", torch.int32, "none")]


def _check_conv(emu, case, seed, channels_last=False, epilogues=_epilogues):
    x, wt, scale, bias, geometry = _conv_inputs(case, seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for with_bias, scale_kind, out_dtype, act in epilogues(wt.shape[0]):
        sc = {"channel": scale, "tensor": scale[:1].reshape(()) * 50, "one": torch.tensor(1.0)}[scale_kind]
        b = bias if with_bias else None
        got = _run_conv(emu, x, wt, b, sc, geometry, out_dtype, act)
        want = _run_conv(cpu, x, wt, b, sc, geometry, out_dtype, act)
        assert_same(got, want, "%s %s %s bias=%s" % (case[0], out_dtype, act, with_bias))
        assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
            memory_format=torch.channels_last)


@pytest.mark.parametrize("case", CONV_CASES, ids=[c[0] for c in CONV_CASES])
@pytest.mark.parametrize("setting", [SETTINGS[0], SETTINGS[2]], ids=[SETTING_IDS[0], SETTING_IDS[2]])
def test_conv2d_int8_every_case(emu, monkeypatch, setting, case):
    apply_setting(monkeypatch, *setting)
    _check_conv(emu, case, seed=zlib.crc32(case[0].encode()) % 1000)


@pytest.mark.parametrize("case", MOBILENET_KINDS, ids=[c[0] for c in MOBILENET_KINDS])
def test_conv2d_int8_mobilenet_kinds_under_every_setting(emu, emu_setting, case):
    _check_conv(emu, case, seed=7, channels_last=True, epilogues=_order_sensitive_epilogues)


LINEAR_CASES = [((5, 64), 10), ((2, 3, 33), 7), ((1, 1024), 126), ((0, 16), 4), ((70, 200), 65)]


@pytest.mark.parametrize("shape,o", LINEAR_CASES, ids=[str(c) for c in LINEAR_CASES])
def test_linear_int8(emu, emu_setting, shape, o):
    gen = torch.Generator().manual_seed(o)
    x = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
    w = torch.randint(-128, 128, (o, shape[-1]), dtype=torch.int8, generator=gen)
    scale, bias = torch.rand(o, generator=gen) * 1e-3, torch.randn(o, generator=gen)
    for b, sc, out_dtype, act in ((bias, scale, torch.float32, "relu"), (None, scale[:1] * 30, torch.int8, "relu6"),
                                  (bias, scale * 20, torch.int8, "none"), (None, torch.tensor(1.0), torch.int32, "none")):
        assert_same(emu.linear_int8(x, w, b, sc, out_dtype, act), cpu.linear_int8(x, w, b, sc, out_dtype, act),
                    "linear %s %s" % (out_dtype, act))


def test_argument_errors_match_the_cpu_kernels(emu):
    x = torch.randint(-5, 5, (1, 4, 5, 5), dtype=torch.int8)
    w = torch.randint(-5, 5, (8, 4, 3, 3), dtype=torch.int8)
    for args in ((x.float(), w), (x, w[:, :3]), (x, w.view(8, 36))):
        with pytest.raises(RuntimeError) as want:
            cpu.conv2d_int8(*args, None, [1, 1], [1, 1], [1, 1], 1, torch.tensor(1.0), torch.float32, "none")
        with pytest.raises(RuntimeError) as got:
            emu.conv2d_int8(*args, None, [1, 1], [1, 1], [1, 1], 1, torch.tensor(1.0), torch.float32, "none")
        assert str(want.value).split("\n")[0] == str(got.value).split("\n")[0]


# --- the tensor-core implicit GEMM: every CTA tile, tile edges, k-tiles around the pipeline depth, split-K ---

def _launches(emu, fn):
    emu.emu_reset()
    out = fn()
    return out, list(emu.emu_launch_log())


def _grid(line):
    grid = line.split("grid=(")[1].split(")")[0]
    block = line.split("block=(")[1].split(")")[0]
    return tuple(int(v) for v in grid.split(",")), int(block.split(",")[0])


# QKERNELS_CUDA_INT8_KERNEL -> (tile rows, tile columns, threads). mma64x64_twin is not swept here: on the
# emulator (no __CUDA_ARCH__) it runs the very code of mma64x64; its selection is checked by the linear
# test below and its PTX counterpart by test_mma_gpu.py on a GPU.
TILES = {"mma128x128": (128, 128, 256), "mma64x64": (64, 64, 128), "mma16x128": (16, 128, 128)}

# (name, N, C, H, W, O, kernel, stride, padding, dilation, groups): C % 16 == 0; M, O and K end inside tiles
TC_CASES = [
    ("C16 3x3 M70 O24 K144", 2, 16, 5, 7, 24, 3, 1, 1, 1, 1),
    ("C48 rect kernel stride dilation K288", 1, 48, 9, 8, 20, (3, 2), (2, 1), (1, 1), (2, 1), 1),
    ("C64 1x1 M135 O130", 1, 64, 9, 15, 130, 1, 1, 0, 1, 1),
    ("C64 3x3 s2 M9 9 k-tiles", 1, 64, 6, 6, 72, 3, 2, 1, 1, 1),
    ("C32 1x1 M129 K32", 3, 32, 43, 1, 16, 1, 1, 0, 1, 1),
]
SPLITS = ["1", "2", "3", "64"]  # 64: more than the k-tiles, capped


def _tc_epilogues(o, gen):
    scale, bias = torch.rand(o, generator=gen) * 1e-3 + 1e-5, torch.randn(o, generator=gen)
    return [(bias, scale, torch.float32, "relu"), (None, scale[:1] * 40, torch.int8, "relu6"),
            (None, torch.tensor(1.0), torch.int32, "none")]


@pytest.mark.parametrize("kernel", list(TILES))
@pytest.mark.parametrize("case", TC_CASES, ids=[c[0] for c in TC_CASES])
def test_tensor_core_tiles_edges_and_split_k(emu, monkeypatch, case, kernel):
    x, wt, _, _, geometry = _conv_inputs(case, seed=len(case[0]))
    s, p, d, g = geometry
    n, c, h, w = x.shape
    o, kh, kw = wt.shape[0], wt.shape[2], wt.shape[3]
    oh, ow = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1, (w + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    m, k_tiles = n * oh * ow, -(-kh * kw * c // 64)
    bm, bn, threads = TILES[kernel]
    monkeypatch.setenv("QKERNELS_CUDA_INT8_KERNEL", kernel)
    exact = F.conv2d(x.double(), wt.double(), None, s, p, d, g)
    for splits in SPLITS:
        monkeypatch.setenv("QKERNELS_CUDA_INT8_SPLIT_K", splits)
        for b, sc, out_dtype, act in _tc_epilogues(o, torch.Generator().manual_seed(o)):
            if splits != "1" and out_dtype == torch.float32:
                continue  # split-K: the float output takes the int8 output's path (workspace, last CTA)
            got, log = _launches(emu, lambda: _run_conv(emu, x, wt, b, sc, geometry, out_dtype, act))
            assert len(log) == 1 and log[0].startswith("igemm_s8_kernel"), log
            assert _grid(log[0]) == ((-(-m // bm), -(-o // bn), min(int(splits), k_tiles)), threads), log
            assert_same(got, _run_conv(cpu, x, wt, b, sc, geometry, out_dtype, act),
                        "%s %s split %s %s %s" % (case[0], kernel, splits, out_dtype, act))
            if out_dtype == torch.int32:
                assert torch.equal(got.double(), exact)


@pytest.mark.parametrize("landing", ["wait", "issue"])
@pytest.mark.parametrize("setting", [SETTINGS[1], SETTINGS[3]], ids=[SETTING_IDS[1], SETTING_IDS[3]])
def test_tensor_core_path_under_other_orders_and_copy_landing(emu, monkeypatch, setting, landing):
    """The automatic choice (tile and split-K from the SM count) under other thread orders, and cp.async
    copies landing at once (a stage refilled while another warp reads it would show) or at the wait."""
    apply_setting(monkeypatch, *setting)
    monkeypatch.setenv("QK_EMU_CP_ASYNC", landing)
    for case in TC_CASES[:4]:
        _check_conv(emu, case, seed=5, channels_last=True, epilogues=_order_sensitive_epilogues)


LINEAR_TC_CASES = [((130, 64), 33), ((3, 7, 96), 40), ((17, 512), 130), ((1, 256), 1000)]


@pytest.mark.parametrize("kernel", ["auto", "mma128x128", "mma16x128", "mma64x64_twin"])
def test_linear_int8_on_the_tensor_cores(emu, monkeypatch, kernel):
    monkeypatch.setenv("QKERNELS_CUDA_INT8_KERNEL", kernel)
    for shape, o in LINEAR_TC_CASES:
        gen = torch.Generator().manual_seed(o)
        x = torch.randint(-128, 128, shape, dtype=torch.int8, generator=gen)
        w = torch.randint(-128, 128, (o, shape[-1]), dtype=torch.int8, generator=gen)
        for b, sc, out_dtype, act in _tc_epilogues(o, gen):
            got, log = _launches(emu, lambda: emu.linear_int8(x, w, b, sc, out_dtype, act))
            assert len(log) == 1 and log[0].startswith("igemm_s8_kernel"), log
            assert_same(got, cpu.linear_int8(x, w, b, sc, out_dtype, act), "linear %s %s %s" % (shape, o, out_dtype))


def _kernel_of(emu, case, seed=0):
    x, wt, scale, bias, geometry = _conv_inputs(case, seed)
    _, log = _launches(emu, lambda: _run_conv(emu, x, wt, bias, scale, geometry, torch.float32, "none"))
    return [line.split(" ")[0] for line in log]


def test_each_conv_runs_on_the_kernel_meant_for_it(emu, monkeypatch):
    """Tensor cores for groups 1 and C % 16 == 0, the tiled depthwise kernel for C % 4 == 0, the general
    kernels otherwise (and for everything when asked)."""
    by_name = {c[0]: c for c in CONV_CASES}
    assert _kernel_of(emu, by_name["pw 512->512"]) == ["igemm_s8_kernel<Cfg,"]
    assert _kernel_of(emu, by_name["extra 3x3 256->512 s2 4->2"]) == ["igemm_s8_kernel<Cfg,"]
    assert _kernel_of(emu, by_name["stem 3->32 s2"]) == ["conv_gemm_kernel"]
    assert _kernel_of(emu, by_name["groups 2"]) == ["conv_gemm_kernel"]
    assert _kernel_of(emu, by_name["dw200 s2 odd"]) == ["depthwise_tile_kernel<4>"]
    assert _kernel_of(emu, by_name["dw32 s1"]) == ["depthwise_tile_kernel<16>"]
    assert _kernel_of(emu, by_name["dw 4x2 kernel stride (3, 1)"]) == ["depthwise_kernel"]  # C = 70
    monkeypatch.setenv("QKERNELS_CUDA_INT8_KERNEL", "general")
    assert _kernel_of(emu, by_name["pw 512->512"]) == ["conv_gemm_kernel"]
    assert _kernel_of(emu, by_name["dw32 s1"]) == ["depthwise_kernel"]


DW_TILE_CASES = [
    ("dw 5x5 dilation 4: the input tile shrinks to fit", 1, 64, 40, 40, 64, 5, 1, 8, 4, 64),
    ("dw dilation 100: no tile fits, general kernel", 1, 4, 202, 202, 4, 3, 1, 0, 100, 4),
    ("dw 48 channels 16-byte loads, 8x16 tiles", 2, 48, 19, 21, 48, 3, 2, 1, 1, 48),
]


@pytest.mark.parametrize("case", DW_TILE_CASES, ids=[c[0] for c in DW_TILE_CASES])
def test_depthwise_tiles(emu, case):
    _check_conv(emu, case, seed=3, channels_last=True)


@pytest.mark.parametrize("kernel", ["general", "mma64x64"])
def test_general_kernels_on_tensor_core_shapes(emu, monkeypatch, kernel):
    """QKERNELS_CUDA_INT8_KERNEL=general keeps the general kernels tested on the shapes the fast paths
    take; a forced tile on a conv the tensor cores cannot take falls back to them."""
    monkeypatch.setenv("QKERNELS_CUDA_INT8_KERNEL", kernel)
    by_name = {c[0]: c for c in CONV_CASES}
    for name in ("pw 32->64", "dw32 s1", "5x5 stride 3 odd K"):
        _check_conv(emu, by_name[name], seed=1)


# --- weights packed once (pack_conv2d_int8_weight / conv2d_int8_packed) or stored in the kernels' layout ---

LAYOUT_CASES = [c for c in CONV_CASES if c[0] in ("pw 32->64", "extra 3x3 128->256 s2 3->2", "dw32 s1", "dw200 s2 odd",
                                                    "groups 4 multiplier 2", "dw 4x2 kernel stride (3, 1)")]


def _is_depthwise(wt, groups):
    return wt.shape[1] == 1 and wt.shape[0] == groups


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def test_packed_weights_give_the_same_result(emu, case):
    """The CUDA pack: [O][kh][kw][C/g] for the GEMMs, 16 bytes then [kh][kw][C] for depthwise convs. Given
    to conv2d_int8_packed it replaces the per-call permute; a pack of the other kind or another shape is
    ignored; a weight stored in the kernels' memory layout is read in place."""
    x, wt, scale, bias, geometry = _conv_inputs(case, seed=2)
    g = geometry[3]
    packed = emu.pack_conv2d_int8_weight(wt, g)
    if _is_depthwise(wt, g):
        assert torch.equal(packed[16:], wt[:, 0].permute(1, 2, 0).flatten())
        in_layout = wt.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)  # [kh][kw][C] strides
    else:
        assert torch.equal(packed, wt.permute(0, 2, 3, 1).flatten())
        in_layout = wt.contiguous(memory_format=torch.channels_last)
    s, p, d, _ = geometry
    for out_dtype, act in ((torch.float32, "relu"), (torch.int8, "none")):
        want = _run_conv(cpu, x, wt, bias, scale, geometry, out_dtype, act)
        other_kind = torch.zeros(wt.numel() + (0 if _is_depthwise(wt, g) else 16), dtype=torch.int8)
        for blob in (packed, torch.empty(0, dtype=torch.int8), packed[:-1], other_kind):
            got = emu.conv2d_int8_packed(x, wt, blob, bias, s, p, d, g, scale, out_dtype, act)
            assert_same(got, want, "%s packed %d bytes" % (case[0], blob.numel()))
        assert_same(_run_conv(emu, x, in_layout, bias, scale, geometry, out_dtype, act), want, case[0] + " in layout")


def test_a_pack_saves_the_per_call_layout_copy(emu, monkeypatch):
    """With the pack (or a weight in layout) the call reads it as it is: the same kernel and result as with a
    copy made per call, checked by poisoning the weight the pack was made from."""
    by_name = {c[0]: c for c in CONV_CASES}
    for name in ("pw 512->512", "dw32 s1"):
        x, wt, scale, bias, geometry = _conv_inputs(by_name[name], seed=8)
        s, p, d, g = geometry
        packed = emu.pack_conv2d_int8_weight(wt, g)
        want = _run_conv(cpu, x, wt, bias, scale, geometry, torch.int8, "relu")
        poisoned = torch.zeros_like(wt)  # same shape; only the pack holds the real values
        got, log = _launches(emu, lambda: emu.conv2d_int8_packed(x, poisoned, packed, bias, s, p, d, g, scale,
                                                                 torch.int8, "relu"))
        assert len(log) == 1 and log[0].split(" ")[0] in ("igemm_s8_kernel<Cfg,", "depthwise_tile_kernel<16>"), log
        assert_same(got, want, name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_int8_convs_are_packed_for_cuda_when_converted_or_moved():
    from torch import nn

    from qkernels import QuantizeTranspiler
    from qkernels.nn.int8_layers import Int8Conv2d

    def int8_model(device):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                            nn.ReLU(), nn.Conv2d(32, 16, 1)).to(device)
        t = QuantizeTranspiler(activation_quantize_type="abs_max")
        return t.convert_to_int8(t.freeze_program(t.training_transpile(net)))

    x = torch.randn(2, 16, 9, 8)
    want = int8_model("cpu")(x)
    for model in (int8_model("cuda"), int8_model("cpu").cuda()):
        convs = [m for m in model.modules() if isinstance(m, Int8Conv2d)]
        assert [m._packed_weight.numel() - m.weight.numel() for m in convs] == [0, 16, 0]
        assert all(m._packed_weight.is_cuda for m in convs)
        assert torch.equal(model(x.cuda()).cpu(), want)


@pytest.mark.parametrize("sms,splits", [(132, 8), (16, 2), (1, 1)])
def test_split_k_fills_the_multiprocessors(emu, monkeypatch, sms, splits):
    """pw 1024->1024 on a 3x3 map at batch 1: one 16x128 tile row of 8 CTAs; with more SMs than tiles, the
    16 k-tiles are split (at least 2 each) so that the CTAs cover the SMs (cudaDevAttrMultiProcessorCount)."""
    apply_setting(monkeypatch, sm_count=sms)
    case = next(c for c in CONV_CASES if c[0] == "pw 1024->1024")
    x, wt, scale, bias, geometry = _conv_inputs(case, seed=4)
    got, log = _launches(emu, lambda: _run_conv(emu, x, wt, bias, scale, geometry, torch.int8, "relu"))
    assert len(log) == 1 and _grid(log[0]) == ((1, 8, splits), 128), log
    assert_same(got, _run_conv(cpu, x, wt, bias, scale, geometry, torch.int8, "relu"), "split %d" % splits)


def _misaligned_channels_last(x, offset):
    """x's values, channels-last, at `offset` bytes into its storage (data_ptr not 16-byte aligned)."""
    n, c, h, w = x.shape
    buf = torch.zeros(x.numel() + offset, dtype=x.dtype)
    view = buf[offset:].view(n, h, w, c).permute(0, 3, 1, 2)
    view.copy_(x)
    return view


@pytest.mark.parametrize("offset,gemm,depthwise", [(1, "conv_gemm_kernel", "depthwise_kernel"),
                                                   (4, "conv_gemm_kernel", "depthwise_tile_kernel<4>")])
def test_misaligned_inputs_take_the_kernels_that_allow_them(emu, offset, gemm, depthwise):
    by_name = {c[0]: c for c in CONV_CASES}
    for case, kernel in ((by_name["pw 32->64"], gemm), (by_name["dw32 s1"], depthwise)):
        x, wt, scale, bias, geometry = _conv_inputs(case, seed=6)
        xm = _misaligned_channels_last(x, offset)
        assert xm.is_contiguous(memory_format=torch.channels_last) and xm.data_ptr() % 16 == offset
        got, log = _launches(emu, lambda: _run_conv(emu, xm, wt, bias, scale, geometry, torch.int8, "relu"))
        assert [line.split(" ")[0] for line in log] == [kernel], log
        assert_same(got, _run_conv(cpu, x, wt, bias, scale, geometry, torch.int8, "relu"), case[0])
