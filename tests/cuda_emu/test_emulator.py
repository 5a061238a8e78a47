"""The CUDA emulator's own semantics, one test per feature, each against what CUDA specifies
(selftest_kernels.cu holds the kernels)."""
import itertools
import re

import numpy as np
import pytest
import torch

from .conftest import SETTING_IDS, SETTINGS, apply_setting
from .emu_build import host_has_fma, rewrite_cuda_source

FULL = 0xFFFFFFFF


# --- the pre-pass ---------------------------------------------------------------------------------------

def test_prepass_rewrites_launches_and_keeps_lines():
    src = ('// a comment with k<<<1, 2>>>(x) in it\n'
           'const char* s = "k<<<1>>>()";\n'
           'ns::kernel<float, 4><<<dim3(a, (b > c) ? 1 : 2),\n   256, 0, stream()>>>(x, y);\n'
           'extern __shared__ __align__(16) unsigned char smem[];\n'
           'plain<<<1, 32>>>();\n')
    out = rewrite_cuda_source(src)
    assert out.count("\n") == src.count("\n")
    assert '::qk_emu::launch(__FILE__, __LINE__, "ns::kernel<float, 4>", ns::kernel<float, 4>, ' \
           'dim3(a, (b > c) ? 1 : 2),\n   256, 0, stream())(x, y);' in out
    assert "unsigned char* smem = ::qk_emu::dynamic_shared<unsigned char>();" in out
    assert '::qk_emu::launch(__FILE__, __LINE__, "plain", plain, 1, 32)();' in out
    assert "k<<<1, 2>>>(x)" in out and '"k<<<1>>>()"' in out  # comments and strings untouched
    with pytest.raises(ValueError, match="no closing"):
        rewrite_cuda_source("k<<<1, 2(x);")


# --- blocks, threads, shared memory, stacks ------------------------------------------------------------------

@pytest.mark.parametrize("grid,block", [((3, 2, 2), (5, 3, 2)), ((1, 1, 1), (33, 1, 1)), ((7, 1, 1), (64, 1, 1))])
def test_block_and_thread_coordinates(selftest, emu_setting, grid, block):
    out = selftest.indices(*grid, *block)
    nthreads = block[0] * block[1] * block[2]
    expected = []
    for bz, by, bx in itertools.product(range(grid[2]), range(grid[1]), range(grid[0])):
        for tz, ty, tx in itertools.product(range(block[2]), range(block[1]), range(block[0])):
            expected.append([bx, by, bz, tx, ty, tz, *block, *grid])
    assert out.shape[0] == len(expected) == nthreads * grid[0] * grid[1] * grid[2]
    assert out.tolist() == expected


def test_shared_memory_is_per_block(selftest, emu_setting):
    x = torch.randn(5, 96)
    out = selftest.shared_rotate(x)
    expected = torch.roll(x, -1, dims=1) + 1000.0 * torch.arange(5).view(5, 1)
    assert torch.equal(out, expected)
    assert torch.equal(selftest.dynamic_rotate(x), expected)


def test_every_thread_has_its_own_stack(selftest, emu_setting):
    out = selftest.own_stack(3, 70)
    t = torch.arange(3 * 70, dtype=torch.int64)
    assert torch.equal(out, 64 * t * 1000 + sum(range(64)) + 64)


def test_static_shared_memory_keeps_the_previous_blocks_values_unless_fresh(selftest, monkeypatch):
    apply_setting(monkeypatch, "forward")
    out = selftest.shared_leftover(4).tolist()
    assert out[1:] == [100, 101, 102]  # as on a GPU: what the block before left
    apply_setting(monkeypatch, "forward", fresh_blocks=True)
    assert selftest.shared_leftover(4).tolist() == [0, 0, 0, 0]


# --- barriers -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 31, 96, 1024])
def test_syncthreads_count_and_or(selftest, emu_setting, n):
    g = torch.Generator().manual_seed(n)
    for pred in (torch.randint(0, 2, (n,), generator=g, dtype=torch.int32), torch.ones(n, dtype=torch.int32),
                 torch.zeros(n, dtype=torch.int32)):
        out = selftest.sync_reduce(pred)
        c = int(pred.sum())
        assert out.tolist() == [[c, int(c == n), int(c > 0)]] * n


@pytest.mark.parametrize("threads", [32, 96])
def test_syncwarp_orders_shared_memory_within_a_warp(selftest, emu_setting, threads):
    out = selftest.syncwarp_exchange(threads).tolist()
    assert out == [10 * ((t % 32 + 1) % 32) + t // 32 for t in range(threads)]


# --- warp intrinsics ---------------------------------------------------------------------------------------------------

def ptx_shuffle_source(kind, lane, b, width):
    """Source lane of shfl.sync from the PTX ISA's pseudo-code (c as CUDA's headers set it); -1 = own value."""
    seg = (32 - width) & 31
    clamp = 0 if kind == 1 else 31
    bval = b & 31
    min_lane = lane & seg
    max_lane = min_lane | (clamp & ~seg & 31)
    if kind == 0:
        j, ok = min_lane | (bval & ~seg & 31), True
        ok = j <= max_lane
    elif kind == 1:
        j = lane - bval
        ok = j >= max_lane
    elif kind == 2:
        j = lane + bval
        ok = j <= max_lane
    else:
        j = lane ^ bval
        ok = j <= max_lane
    return j if ok else -1


def model_shuffle(values, args, kind, width, mask):
    out = []
    for t in range(len(values)):
        lane, base = t % 32, t - t % 32
        if not mask >> lane & 1:
            out.append(-1)
            continue
        j = ptx_shuffle_source(kind, lane, args[t], width)
        out.append(values[t] if j < 0 or j == lane else values[base + j])
    return out


@pytest.mark.parametrize("kind", [0, 1, 2, 3], ids=["idx", "up", "down", "xor"])
@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
def test_shuffles_follow_the_ptx_semantics(selftest, emu_setting, kind, width):
    n = 64
    g = torch.Generator().manual_seed(kind * 100 + width)
    values = torch.randint(-1000, 1000, (n,), generator=g, dtype=torch.int32)
    args = torch.randint(0, 40, (n,), generator=g, dtype=torch.int32)
    if kind in (1, 2):
        args = torch.full((n,), int(args[0]) % 9, dtype=torch.int32)  # one delta per call, as code uses it
    out = selftest.shuffle(values, args, kind, width, FULL)
    assert out.tolist() == model_shuffle(values.tolist(), args.tolist(), kind, width, FULL)


def test_shuffle_examples_from_the_cuda_guide(selftest):
    lanes = torch.arange(32, dtype=torch.int32)
    # broadcast from lane 0; rotate down by one (the last lane keeps its value); butterfly swap of halves
    assert selftest.shuffle(lanes, torch.zeros(32, dtype=torch.int32), 0, 32, FULL).tolist() == [0] * 32
    down = selftest.shuffle(lanes, torch.ones(32, dtype=torch.int32), 2, 32, FULL).tolist()
    assert down == list(range(1, 32)) + [31]
    xor16 = selftest.shuffle(lanes, torch.full((32,), 16, dtype=torch.int32), 3, 32, FULL).tolist()
    assert xor16 == list(range(16, 32)) + list(range(16))
    # width 16: xor may reach an earlier group but not a later one, which returns the caller's value
    x16 = selftest.shuffle(lanes, torch.full((32,), 16, dtype=torch.int32), 3, 16, FULL).tolist()
    assert x16 == list(range(16)) + list(range(16))
    up2 = selftest.shuffle(lanes, torch.full((32,), 2, dtype=torch.int32), 1, 8, FULL).tolist()
    assert up2 == [t if t % 8 < 2 else t - 2 for t in range(32)]


def test_partial_masks(selftest, emu_setting):
    values = torch.arange(100, 132, dtype=torch.int32)
    mask = 0x0000FF0F
    args = torch.randint(0, 32, (32,), generator=torch.Generator().manual_seed(3), dtype=torch.int32)
    args = torch.where(torch.tensor([mask >> (int(a)) & 1 for a in args.tolist()], dtype=torch.bool), args,
                       torch.full_like(args, 8))  # only sources inside the mask (strict mode checks that)
    out = selftest.shuffle(values, args, 0, 32, mask)
    assert out.tolist() == model_shuffle(values.tolist(), args.tolist(), 0, 32, mask)


def test_64_and_16_bit_operands_shuffle_whole(selftest):
    d = torch.randn(32, dtype=torch.float64)
    h = torch.randn(32).half()
    od, oh = selftest.shuffle_wide(d, h)
    assert torch.equal(od, d[torch.arange(32) ^ 5])
    src = torch.tensor([t + 3 if t + 3 < 32 else t for t in range(32)])
    assert torch.equal(oh.view(torch.int16), h[src].view(torch.int16))


@pytest.mark.parametrize("mask", [FULL, 0x0F0F0F0F, 0x80000001, 0x00000001])
def test_votes_reductions_and_matches(selftest, emu_setting, mask):
    g = torch.Generator().manual_seed(mask & 0xFFFF)
    values = torch.randint(0, 1 << 10, (64,), generator=g, dtype=torch.int32)
    values[32:] = 0x300  # a warp whose lanes all match
    out = selftest.vote(values, mask).tolist()
    for w in range(2):
        lanes = [l for l in range(32) if mask >> l & 1]
        vs = [int(values[32 * w + l]) for l in lanes]
        ballot = sum(1 << l for l, v in zip(lanes, vs) if v & 1)
        member = sum(1 << l for l in lanes)
        for l in range(32):
            row = out[32 * w + l]
            if not mask >> l & 1:
                assert row == [-1] * 12
                continue
            v = int(values[32 * w + l])
            same = sum(1 << q for q, u in zip(lanes, vs) if u >> 4 == v >> 4)
            all_same = len({u >> 8 for u in vs}) == 1
            expected = [ballot - (1 << 32 if ballot >> 31 else 0), int(ballot != 0), int(ballot == member),
                        sum(vs), min(vs), max(vs), np.bitwise_and.reduce(vs), np.bitwise_or.reduce(vs),
                        np.bitwise_xor.reduce(vs), same - (1 << 32 if same >> 31 else 0),
                        (member - (1 << 32 if member >> 31 else 0)) if all_same else 0, int(all_same)]
            assert row == [int(e) for e in expected], (w, l)


# --- atomics -------------------------------------------------------------------------------------------------------------

def test_atomics(selftest, emu_setting):
    blocks, threads = 3, 96
    cells, olds = selftest.atomics(blocks, threads)
    t = np.arange(blocks * threads)
    c = cells.tolist()
    assert c[0] == (t % 7 - 3).sum()                      # atomicAdd int
    assert c[1] == (t * 13 % 101 - 50).max()               # atomicMax int
    assert c[2] == (t * 13 % 101 - 50).min()               # atomicMin int
    assert c[3] == 2 * len(t)                              # atomicCAS loop
    assert c[5] == (t + 1).sum()                           # atomicAdd unsigned
    assert c[6] == (t * 7919 % 1000).max()                 # atomicMax unsigned
    assert c[7] == (t * 7919 % 1000 + 5).min()             # atomicMin unsigned
    assert c[8] == len(t) % 10                             # atomicInc wraps at 9
    assert c[9] == float(int((t.astype(object) << 33).sum()))
    assert c[10] == float(int(t.max()) << 40) and c[11] == float(3 << 40)
    assert c[12] == float(len(t) << 35)
    assert c[13] == 0.5 * len(t)                           # float atomicAdd of exact halves
    # atomicExch: every id was written once, so the olds and the final value are the ids and -1
    assert sorted(olds.tolist() + [int(c[4])]) == [-1] + t.tolist()
    assert c[14] in t.astype(float)


# --- intrinsics, vector types, 16-bit floats ---------------------------------------------------------------------------------

def test_integer_and_bit_intrinsics(selftest):
    g = torch.Generator().manual_seed(5)
    n = 300  # more than the 3 x 64 threads: the kernel's grid-stride loop covers the rest
    a = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    b = torch.randint(-2 ** 31, 2 ** 31 - 1, (n,), generator=g, dtype=torch.int64).to(torch.int32)
    c = torch.randint(-2 ** 20, 2 ** 20, (n,), generator=g, dtype=torch.int32)
    f = torch.randn(n, generator=g) * 100
    f[:4] = torch.tensor([2.5, -2.5, 3.5, 1e10])
    out = selftest.intrinsics(a, b, c, f)
    ab = a.view(torch.uint8).view(n, 4).to(torch.int64)
    bb = b.view(torch.uint8).view(n, 4).to(torch.int64)
    signed = (ab.to(torch.int8).to(torch.int64) * bb.to(torch.int8).to(torch.int64)).sum(1) + c
    unsigned = (ab * bb).sum(1) + c.to(torch.int64) % 2 ** 32
    wrap = lambda v: ((v + 2 ** 31) % 2 ** 32 - 2 ** 31).to(torch.int32)
    assert torch.equal(out[:, 0], wrap(signed))
    assert torch.equal(out[:, 1], wrap(unsigned))
    assert torch.equal(out[:, 2], f.view(torch.int32))
    assert out[:, 3].all() and out[:, 4].all()
    assert torch.equal(out[:, 5], torch.tensor([bin(v % 2 ** 32).count("1") for v in a.tolist()], dtype=torch.int32))
    # __byte_perm(x, y, 0x5140): bytes x0, y0, x1, y1
    xb, yb = ab, bb
    perm = xb[:, 0] | (yb[:, 0] << 8) | (xb[:, 1] << 16) | (yb[:, 1] << 24)
    assert torch.equal(out[:, 6], wrap(perm))
    rn = torch.round(f.double())  # round half to even, saturated to int32
    assert torch.equal(out[:, 7], rn.clamp(-2 ** 31, 2 ** 31 - 1).to(torch.int32))


def test_vector_types(selftest):
    layouts = selftest.vector_layouts()
    assert layouts == [4, 4, 4, 4, 8, 8, 16, 16, 8, 8, 16, 16, 4, 4, 16, 16, 2, 4]
    bytes_ = torch.randint(-128, 128, (12 * 4,), dtype=torch.int8)
    floats = torch.randint(-50, 50, (12 * 4,)).float()
    out = selftest.vectors(bytes_, floats)
    cb, fl = bytes_.view(12, 4).int(), floats.view(12, 4)
    expected = torch.stack([cb[:, 0] + cb[:, 1], cb[:, 2] - cb[:, 3], fl[:, 0].int() + fl[:, 3].int(),
                            (fl[:, 1] * fl[:, 2]).int()], 1)
    assert torch.equal(out, expected)


def test_half_and_bfloat16_round_to_nearest_even(selftest):
    g = torch.Generator().manual_seed(11)
    bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, -65520.0, 2.0 ** -24, 2.0 ** -25,
                            2.0 ** -25 * 1.0001, 2.0 ** -14, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11, float("inf"),
                            -float("inf"), 3.3895314e38, 1.0 + 2.0 ** -8, 1.0 + 3 * 2.0 ** -8])
    x = torch.cat([x, special])
    x = x[~torch.isnan(x)]
    h, b, hf, bf = selftest.half_conversions(x)
    assert torch.equal(h, x.half().view(torch.int16))       # torch's CPU conversion rounds to nearest even
    assert torch.equal(b, x.bfloat16().view(torch.int16))
    assert torch.equal(hf, x.half().float()) and torch.equal(bf, x.bfloat16().float())
    nan = torch.tensor([float("nan"), -float("nan")])
    hn, bn, hfn, bfn = selftest.half_conversions(nan)
    assert hn.tolist() == [0x7FFF, 0x7FFF] and bn.tolist() == [0x7FFF, 0x7FFF]  # the device's canonical NaN
    assert torch.isnan(hfn).all() and torch.isnan(bfn).all()


@pytest.mark.skipif(not host_has_fma(), reason="this processor has no FMA3, so the emulated code cannot contract")
def test_products_contract_into_fma_like_nvcc(selftest):
    # a*b = 1 + 2^-11 + 2^-24 is not a float; fused with c = -(1 + 2^-11) it leaves 2^-24, rounded first 0
    a = torch.tensor([1 + 2 ** -12, 3.0, 1 + 2 ** -12], dtype=torch.float32)
    b = torch.tensor([1 + 2 ** -12, 5.0, 1 + 2 ** -12], dtype=torch.float32)
    c = torch.tensor([-(1 + 2 ** -11), 1.0, 0.0], dtype=torch.float32)
    fused, separate = selftest.contraction(a, b, c)
    assert fused.tolist() == [2 ** -24, 16.0, float(torch.tensor(1 + 2 ** -11 + 2 ** -24, dtype=torch.float32))]
    assert separate.tolist()[:2] == [0.0, 16.0]


def test_grid_stride_loops_cover_any_size(selftest, emu_setting):
    x = torch.randn(10007)
    for blocks, threads in ((1, 32), (7, 64), (200, 256)):
        assert torch.equal(selftest.grid_stride(x, blocks, threads), 2 * x + 1)


# --- orders, launch checks, device attributes -----------------------------------------------------------------------------

def test_thread_and_block_orders(selftest, monkeypatch):
    apply_setting(monkeypatch, "forward")
    t, b = selftest.order_trace(5, 64)
    assert t.tolist() == [list(range(64))] * 5 and b.tolist() == list(range(5))
    apply_setting(monkeypatch, "reverse")
    t, b = selftest.order_trace(5, 64)
    assert t.tolist() == [list(range(63, -1, -1))] * 5 and b.tolist() == list(range(4, -1, -1))
    apply_setting(monkeypatch, "random", seed=3)
    t1, b1 = selftest.order_trace(5, 64)
    t2, b2 = selftest.order_trace(5, 64)
    apply_setting(monkeypatch, "random", seed=4)
    t3, b3 = selftest.order_trace(5, 64)
    assert torch.equal(t1, t2) and torch.equal(b1, b2)        # reproducible for a seed
    assert not torch.equal(t1, t3)                            # and different for another
    assert sorted(b1.tolist()) == list(range(5)) and all(sorted(r) == list(range(64)) for r in t1.tolist())
    assert t1.tolist() != [list(range(64))] * 5


CUDA_ERRORS = {"cudaSuccess": 0, "cudaErrorInvalidValue": 1, "cudaErrorInvalidConfiguration": 9}


@pytest.mark.parametrize("which,error,ran", [
    (0, "cudaSuccess", 2), (1, "cudaErrorInvalidConfiguration", 0), (2, "cudaErrorInvalidConfiguration", 0),
    (3, "cudaErrorInvalidConfiguration", 0), (4, "cudaErrorInvalidConfiguration", 0),
    (5, "cudaErrorInvalidValue", 0), (6, "cudaSuccess", 1), (7, "cudaErrorInvalidConfiguration", 0)],
    ids=["ok", "zero-blocks", "1025-threads", "grid-y", "grid-z", "64KiB-shared", "64KiB-opted-in", "block-z"])
def test_launch_configuration_errors(selftest, which, error, ran):
    assert selftest.launch_config(which) == [CUDA_ERRORS[error], ran]


def test_launch_check_raises_the_cuda_message(selftest):
    with pytest.raises(RuntimeError, match=r"CUDA error: invalid configuration argument.*2048 threads"):
        selftest.launch_check_raises()
    assert selftest.launch_config(0) == [0, 2]  # the error was consumed


def test_device_attributes_follow_the_sm_count_setting(selftest, monkeypatch):
    seen = {}
    for sms in (132, 4, 1, 132):
        monkeypatch.setenv("QK_EMU_SM_COUNT", str(sms))
        device, got, warp, major, smem = selftest.device_attributes()
        assert (got, warp, major, smem) == (sms, 32, 9, 227 * 1024)
        seen.setdefault(sms, device)
        assert seen[sms] == device  # one device index per SM count, for caches keyed by device


# --- faults ------------------------------------------------------------------------------------------------------------------

FAULT_CASES = [
    (0, 64, True, r"deadlock: the threads of the block wait at different barriers; threads [\d,]+ wait at "
                  r"__syncthreads \(selftest_kernels\.cu:\d+\); threads [\d,]+ wait at __syncthreads"),
    (1, 64, True, r"deadlock: no thread can run; threads 0-4,6-31 wait at __shfl_sync with mask 0xffffffff "
                  r"\(selftest_kernels\.cu:\d+\); threads 5 wait at __syncthreads \(selftest_kernels\.cu:\d+\); "
                  r"threads 32-63 wait at __syncthreads"),
    (2, 32, True, r"lane \d+: __shfl_sync reads lane 20, which is not an active lane of mask 0x0000ffff"),
    (3, 32, True, r"16 threads exited while the others wait at __syncthreads \(selftest_kernels\.cu:\d+\)"),
    # lanes 0-7 name the whole warp, lanes 8-31 only themselves: depending on who arrives first this is
    # a mask mismatch, or lanes 8-31 complete alone and exit, and lanes 0-7 then read an exited lane
    (4, 32, True, r"(different masks 0xffffffff and 0xffffff00|reads lane 8, which is not an active lane of mask "
                  r"0xffffffff)"),
    (5, 32, True, r"thread \(\d+,0,0\) executed __trap\(\)"),
]


@pytest.mark.parametrize("which,threads,strict,message", FAULT_CASES, ids=["two-barriers", "warp-vs-block", "read-outside-mask",
                                                                            "exit-before-barrier", "mask-mismatch", "trap"])
def test_faults_are_reported_with_file_and_line(selftest, monkeypatch, which, threads, strict, message):
    for order in ("forward", "reverse", "random"):
        apply_setting(monkeypatch, order, seed=1, strict=strict)
        with pytest.raises(RuntimeError, match=r"qk_emu: kernel fault_kernel launched at selftest_kernels\.cu:\d+, "
                                               r"block \(0,0,0\): .*" + message):
            selftest.fault(which, threads)


def test_non_strict_mode_lets_undefined_reads_return_the_callers_value(selftest, monkeypatch):
    apply_setting(monkeypatch, "forward", strict=False)
    selftest.fault(2, 32)  # reading outside the mask: the caller's value, no fault
    selftest.fault(3, 32)  # exit before a barrier: the barrier releases the threads still alive


def test_the_emulator_keeps_working_after_a_fault(selftest):
    with pytest.raises(RuntimeError):
        selftest.fault(0, 64)
    x = torch.randn(2, 40)
    assert torch.equal(selftest.shared_rotate(x), torch.roll(x, -1, 1) + 1000.0 * torch.arange(2).view(2, 1))
