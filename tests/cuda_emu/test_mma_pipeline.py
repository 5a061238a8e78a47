"""cp.async's twin and the emulator's model of its asynchrony (tests/cuda_emu/include/qk_emu/async_copy.h), and
the multistage pipeline of csrc/cuda/mma/pipeline.h under both landing times and every thread order."""
import numpy as np
import pytest
import torch

from .conftest import SETTINGS, SETTING_IDS, apply_setting
from .mma_ops import HW, TWIN, emulated

FILL = 0xFF  # what the emulator fills dynamic shared memory with at every block


@pytest.fixture(scope="module")
def ops():
    return emulated()


def cp_async_case(threads, groups, seed):
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, 16 * 40).astype(np.uint8)
    chunk = rng.integers(-1, 40, (threads, groups)).astype(np.int32)  # -1: zero-fill
    want = np.zeros((threads, groups, 16), np.uint8)
    for t in range(threads):
        for q in range(groups):
            if chunk[t, q] >= 0:
                want[t, q] = src[16 * chunk[t, q]:16 * chunk[t, q] + 16]
    return torch.from_numpy(src), torch.from_numpy(chunk), want


@pytest.mark.parametrize("arch", [HW, TWIN], ids=["hw", "twin"])
@pytest.mark.parametrize("kept", [0, 1, 2])
def test_copies_land_when_their_group_is_waited_for(ops, monkeypatch, arch, kept):
    """QK_EMU_CP_ASYNC=wait: nothing is visible before a wait; wait<kept> lands all but the `kept` most
    recent groups; invalid sources are zero-filled."""
    monkeypatch.setenv("QK_EMU_CP_ASYNC", "wait")
    src, chunk, want = cp_async_case(threads=40, groups=3, seed=kept)
    before, after = (t.numpy() for t in ops.cp_async(src, chunk, kept, arch))
    assert (before == FILL).all()
    np.testing.assert_array_equal(after[:, :3 - kept], want[:, :3 - kept])
    assert (after[:, 3 - kept:] == FILL).all()


def test_copies_land_at_once_when_asked(ops, monkeypatch):
    monkeypatch.setenv("QK_EMU_CP_ASYNC", "issue")
    src, chunk, want = cp_async_case(threads=33, groups=2, seed=9)
    before, after = (t.numpy() for t in ops.cp_async(src, chunk, 1, TWIN))
    np.testing.assert_array_equal(before, want)
    np.testing.assert_array_equal(after, want)


def pipeline_model(tiles, stages):
    k_tiles, threads = tiles.shape[:2]
    sums = np.zeros(threads, np.int64)
    for kt in range(k_tiles):
        for t in range(threads):
            sums[t] += (kt + 1) * (int(tiles[kt, (t + 1) % threads].astype(np.int64).sum()) + 1000 * (kt % stages))
    return sums


@pytest.mark.parametrize("landing", ["wait", "issue"])
@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_pipeline_delivers_every_k_tile_in_order(ops, monkeypatch, setting, landing, stages):
    """Every k-tile count around the pipeline depth: none, fewer than the stages in flight, exactly, more."""
    apply_setting(monkeypatch, *setting)
    monkeypatch.setenv("QK_EMU_CP_ASYNC", landing)
    rng = np.random.default_rng(stages)
    for k_tiles in sorted({0, 1, stages - 1, stages, 2 * stages + 1}):
        tiles = rng.integers(0, 256, (k_tiles, 64, 16)).astype(np.uint8)
        got = ops.pipeline(torch.from_numpy(tiles), stages, TWIN if k_tiles % 2 else HW).numpy()
        np.testing.assert_array_equal(got, pipeline_model(tiles, stages), err_msg="k_tiles=%d" % k_tiles)
