"""csrc/cuda/conv_int8.cu on the emulator against the CPU kernels, bit for bit: int32 accumulators, the
float epilogue (one fma per element on both devices) and int8 requantization, every activation."""
import zlib

import pytest
import torch

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


def _check_conv(emu, case, seed, channels_last=False):
    x, wt, scale, bias, geometry = _conv_inputs(case, seed)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for with_bias, scale_kind, out_dtype, act in _epilogues(wt.shape[0]):
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
    _check_conv(emu, case, seed=7, channels_last=True)


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
