"""The portable twins of mma.sync.m16n8k32.s8 and ldmatrix.x4 (csrc/cuda/mma) against a Python model of the
PTX ISA's tables ("Matrix Fragments for mma.m16n8k32", .s8 multiplicands, .s32 accumulators; "ldmatrix"),
written from the ISA's element-index formulas, independently of the C++ (which states them per register).
Also the shared-memory swizzle of a k-tile: a bijection, and conflict-free for ldmatrix and cp.async."""
import numpy as np
import pytest
import torch

from .mma_ops import HW, TWIN, emulated

ARCHS = pytest.mark.parametrize("arch", [HW, TWIN], ids=["hw", "twin"])


# --- the ISA's tables ---------------------------------------------------------------------------------

def a_position(lane, i):
    """(row, col) of element a_i (i = 0..15) held by `lane` in a 16x32 .s8 A fragment."""
    group, tig = lane >> 2, lane % 4
    row = group if (i < 4 or 8 <= i < 12) else group + 8
    col = tig * 4 + (i & 0x3) + (16 if i >= 8 else 0)
    return row, col


def b_position(lane, i):
    """(row = k, col = n) of element b_i (i = 0..7) of a 32x8 .s8 B fragment."""
    group, tig = lane >> 2, lane % 4
    row = tig * 4 + (i & 0x3) + (16 if i >= 4 else 0)
    return row, group


def c_position(lane, i):
    """(row, col) of accumulator c_i (i = 0..3) of a 16x8 .s32 C/D fragment."""
    group, tig = lane >> 2, lane % 4
    return (group if i < 2 else group + 8), tig * 2 + (i & 0x1)


def pack_bytes(values):
    """Elements (low to high) -> int32 registers, four int8 per register, element 0 in the low byte."""
    b = np.asarray(values, dtype=np.int8).view(np.uint8).reshape(-1, 4).astype(np.uint32)
    return (b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16) | (b[:, 3] << 24)).view(np.int32)


def a_fragment(a):  # a: [16, 32] int8 -> [32 lanes, 4 registers]
    return np.stack([pack_bytes([a[a_position(l, i)] for i in range(16)]) for l in range(32)])


def b_fragment(b_nk):  # b as [n = 8][k = 32] (B[k][n] = b_nk[n][k]) -> [32, 2]
    return np.stack([pack_bytes([b_nk[b_position(l, i)[::-1]] for i in range(8)]) for l in range(32)])


def c_fragment(c):  # c: [16, 8] int32 -> [32, 4]
    return np.array([[c[c_position(l, i)] for i in range(4)] for l in range(32)], dtype=np.int32)


def c_matrix(frag):  # [32, 4] -> [16, 8]
    c = np.zeros((16, 8), dtype=np.int32)
    for l in range(32):
        for i in range(4):
            c[c_position(l, i)] = frag[l, i]
    return c


def wrap32(v):
    return ((np.asarray(v, dtype=np.int64) + 2 ** 31) % 2 ** 32 - 2 ** 31).astype(np.int32)


def check_mma(ops, arch, a, b, c):
    """a [MI][16][32], b [NI][8][32] (n, k), c [MI][NI][16][8] -> compare D with A B^T + C (mod 2^32)."""
    mi, ni = len(a), len(b)
    fa = torch.from_numpy(np.stack([a_fragment(x) for x in a]))
    fb = torch.from_numpy(np.stack([b_fragment(x) for x in b]))
    fc = torch.from_numpy(np.stack([[c_fragment(c[i][j]) for j in range(ni)] for i in range(mi)]))
    d = ops.mma(fa, fb, fc, arch).numpy()
    for i in range(mi):
        for j in range(ni):
            want = wrap32(a[i].astype(np.int64) @ b[j].astype(np.int64).T + c[i][j])
            np.testing.assert_array_equal(c_matrix(d[i, j]), want, err_msg="tile (%d, %d)" % (i, j))


# --- mma ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ops():
    return emulated()


@ARCHS
@pytest.mark.parametrize("mi,ni", [(1, 1), (2, 4), (3, 2)])
def test_mma_matches_the_isa_layout(ops, arch, mi, ni):
    rng = np.random.default_rng(mi * 10 + ni)
    a = rng.integers(-128, 128, (mi, 16, 32)).astype(np.int8)
    b = rng.integers(-128, 128, (ni, 8, 32)).astype(np.int8)
    c = rng.integers(-2 ** 31, 2 ** 31, (mi, ni, 16, 8)).astype(np.int32)
    check_mma(ops, arch, a, b, c)


@ARCHS
def test_mma_extremes_and_wrapping(ops, arch):
    a = np.full((1, 16, 32), -128, np.int8)
    b = np.full((1, 8, 32), -128, np.int8)
    c = np.full((1, 1, 16, 8), 2 ** 31 - 2 ** 19, np.int32)  # + 32 * 16384 = 2^19 wraps to -2^31
    check_mma(ops, arch, a, b, c)
    # one nonzero element at a time: every (row, k) and (k, n) lands where the table says
    for (r, k, n) in [(0, 0, 0), (7, 3, 5), (8, 16, 2), (15, 31, 7), (9, 20, 1)]:
        a = np.zeros((1, 16, 32), np.int8)
        b = np.zeros((1, 8, 32), np.int8)
        a[0, r, k], b[0, n, k] = 3, -5
        check_mma(ops, arch, a, b, np.zeros((1, 1, 16, 8), np.int32))


# --- ldmatrix -----------------------------------------------------------------------------------------

def ldmatrix_model(image, row_offset):
    """Registers [32][4]: lane l, register i = bytes 4 (l % 4) .. + 3 of the row whose address lane
    8 i + l / 4 gave (ldmatrix .x4 .b16: row l / 4, elements 2 (l % 4), 2 (l % 4) + 1 of matrix i)."""
    out = np.zeros((32, 4), np.int32)
    for lane in range(32):
        for i in range(4):
            start = row_offset[8 * i + lane // 4] + 4 * (lane % 4)
            out[lane, i] = image[start:start + 4].view(np.int32)[0]
    return out


@ARCHS
def test_ldmatrix_matches_the_isa(ops, arch):
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, 1024).astype(np.uint8)
    row_offset = (rng.permutation(64)[:32] * 16).astype(np.int32)  # any 16-byte aligned rows
    got = ops.ldmatrix(torch.from_numpy(image), torch.from_numpy(row_offset), arch).numpy()
    np.testing.assert_array_equal(got, ldmatrix_model(image, row_offset))


def warp_tile_a_rows(lane):  # csrc/cuda/mma/warp_tile.h: (row, 16-byte chunk) of the lane's address
    return lane % 8 + 8 * ((lane // 8) % 2), lane // 16


def warp_tile_b_rows(lane):
    return lane % 8 + 8 * (lane // 16), (lane // 8) % 2


@ARCHS
def test_ldmatrix_row_addresses_of_the_warp_tile_give_mma_fragments(ops, arch):
    """A 16x32 row-major A tile and a 16(n)x32 B tile (two n8 blocks) read with the lane -> row mapping of
    warp_tile.h are the ISA's A fragment and two B fragments."""
    rng = np.random.default_rng(4)
    a = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    offsets = np.array([r * 32 + 16 * c for r, c in map(warp_tile_a_rows, range(32))], np.int32)
    got = ops.ldmatrix(torch.from_numpy(a.view(np.uint8).ravel().copy()), torch.from_numpy(offsets), arch).numpy()
    np.testing.assert_array_equal(got, a_fragment(a))
    b = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    offsets = np.array([r * 32 + 16 * c for r, c in map(warp_tile_b_rows, range(32))], np.int32)
    got = ops.ldmatrix(torch.from_numpy(b.view(np.uint8).ravel().copy()), torch.from_numpy(offsets), arch).numpy()
    np.testing.assert_array_equal(got[:, :2], b_fragment(b[:8]))
    np.testing.assert_array_equal(got[:, 2:], b_fragment(b[8:]))


# --- the k-tile swizzle ---------------------------------------------------------------------------------

def test_swizzle_is_a_bijection_without_bank_conflicts(ops):
    rows = 128
    off = ops.swizzled_offsets(torch.arange(rows, dtype=torch.int32)).numpy()  # [row][logical chunk] -> byte offset
    assert (off % 16 == 0).all() and sorted(off.ravel() // 16) == list(range(rows * 4))
    assert all((off[r] // 64 == r).all() for r in range(rows))  # a chunk stays in its row
    bank_group = (off // 16) % 8  # 8 groups of 4 banks: 16 bytes each, 128 bytes per wavefront
    for r0 in range(0, rows, 8):  # ldmatrix: 8 consecutive rows at one logical chunk, one wavefront
        for c in range(4):
            assert len(set(bank_group[r0:r0 + 8, c])) == 8, (r0, c)
    for r0 in range(0, rows, 2):  # cp.async: 8 consecutive threads store rows r0, r0 + 1, chunks 0..3
        assert len(set(bank_group[r0:r0 + 2].ravel())) == 8, r0
