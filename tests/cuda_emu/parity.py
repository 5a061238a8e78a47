"""Bit-for-bit comparison of an emulated CUDA result with the CPU kernel's."""
import torch


def _bits(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32,):
        return t.view(torch.int32)
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16)
    if t.dtype == torch.float64:
        return t.view(torch.int64)
    return t


def assert_same(gpu, cpu, what=""):
    """Same dtype, shape and bits; NaN must be NaN at the same places (its payload may differ: the device
    writes the canonical 0x7fff NaN for 16-bit floats, c10's CPU conversion another one)."""
    if isinstance(cpu, (tuple, list)):
        assert len(gpu) == len(cpu), what
        for i, (g, c) in enumerate(zip(gpu, cpu)):
            assert_same(g, c, "%s[%d]" % (what, i))
        return
    assert gpu.dtype == cpu.dtype, "%s: dtype %s vs %s" % (what, gpu.dtype, cpu.dtype)
    assert gpu.shape == cpu.shape, "%s: shape %s vs %s" % (what, tuple(gpu.shape), tuple(cpu.shape))
    if gpu.is_floating_point():
        nan_g, nan_c = torch.isnan(gpu), torch.isnan(cpu)
        assert torch.equal(nan_g, nan_c), "%s: NaN at different places" % what
        g, c = _bits(gpu.contiguous())[~nan_g], _bits(cpu.contiguous())[~nan_c]
    else:
        g, c = gpu, cpu
    if not torch.equal(g, c):
        diff = (g != c).nonzero()
        first = diff[0].tolist() if diff.numel() else None
        raise AssertionError("%s: %d of %d elements differ (first at %s)" % (what, (g != c).sum().item(), g.numel(),
                                                                           first))
