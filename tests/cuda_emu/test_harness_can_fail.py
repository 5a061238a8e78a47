"""The parity harness must be able to fail: a copy of the fake-quant kernels with one barrier removed
(in block_reduce.cuh's block_max, the one between the warps' partial maxima and every thread's read of
them; the copy inlines that header) is built as its own twin library, and under some thread order it
must disagree with the CPU kernel, while the intact build agrees."""
import re

import pytest
import torch

from . import emu_build
from .conftest import apply_setting

HEADER = "block_reduce.cuh"
FUNCTION = "block_max"


def remove_first_barrier(path, text):
    """Inline HEADER into the source with the first __syncthreads() of FUNCTION's body deleted."""
    header = (emu_build.CSRC / "cuda" / HEADER).read_text().replace("#pragma once", "")
    m = re.search(r"\b%s\s*\([^)]*\)\s*\{" % FUNCTION, header)
    assert m, "%s: no function %s to break (update this test with the kernel)" % (HEADER, FUNCTION)
    barrier = header.find("__syncthreads();", m.end())
    assert barrier > 0, "%s: no __syncthreads() in %s to remove" % (HEADER, FUNCTION)
    broken = header[:barrier] + "/* barrier removed */" + header[barrier + len("__syncthreads();"):]
    include = '#include "%s"' % HEADER
    assert include in text, "%s does not include %s (update this test with the kernel)" % (path.name, HEADER)
    return text.replace(include, broken)


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
            # one block of 256 threads, each reading slots t, t + 256, ... of 4 floats: the maximum lies in
            # slot 200, read by warp 6, whose partial the other warps must wait for
            x = torch.randn(4096, generator=torch.Generator().manual_seed(i))
            x[4 * 200] = 100.0 + i
            want = torch.ops.qkernels.abs_max(x)
            intact_ok &= torch.equal(emu.abs_max(x), want)
            if not torch.equal(broken.abs_max(x), want):
                caught.append((order, fresh, i))
    assert intact_ok, "the intact kernels must agree with the CPU under every order"
    assert caught, "no thread order exposed the missing barrier: the harness cannot fail"
