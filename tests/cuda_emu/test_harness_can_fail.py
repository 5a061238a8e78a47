"""The parity harness must be able to fail: a copy of the fake-quant kernels with one barrier removed
(the one between the warps' partial maxima and the final warp's read of them) is built as its own twin
library, and under some thread order it must disagree with the CPU kernel, while the intact build agrees."""
import re

import pytest
import torch

from . import emu_build
from .conftest import apply_setting

FUNCTION = "block_max_to"


def remove_first_barrier(path, text):
    """Delete the first __syncthreads() of FUNCTION's body."""
    m = re.search(r"\b%s\s*\([^)]*\)\s*\{" % FUNCTION, text)
    assert m, "%s: no function %s to break (update this test with the kernel)" % (path.name, FUNCTION)
    body = m.end()
    barrier = text.find("__syncthreads();", body)
    assert barrier > 0, "%s: no __syncthreads() in %s to remove" % (path.name, FUNCTION)
    return text[:barrier] + "/* barrier removed */" + text[barrier + len("__syncthreads();"):]


@pytest.fixture(scope="module")
def broken():
    return emu_build.build_library("qkernels_emu_broken", [emu_build.CSRC / "cuda" / "fake_quant.cu"],
                                   transform=remove_first_barrier)


def test_a_removed_barrier_is_caught(emu, broken, monkeypatch):
    caught, intact_ok = [], True
    for order, fresh in (("forward", False), ("reverse", False), ("random", False), ("forward", True),
                         ("random", True)):
        apply_setting(monkeypatch, order, seed=5, fresh_blocks=fresh)
        for i in range(3):
            # one block of 256 threads; the maximum lies in warp 6, whose partial the last warp must wait for
            x = torch.randn(256, generator=torch.Generator().manual_seed(i))
            x[200] = 100.0 + i
            want = torch.ops.qkernels.abs_max(x)
            intact_ok &= torch.equal(emu.abs_max(x), want)
            if not torch.equal(broken.abs_max(x), want):
                caught.append((order, fresh, i))
    assert intact_ok, "the intact kernels must agree with the CPU under every order"
    assert caught, "no thread order exposed the missing barrier: the harness cannot fail"
