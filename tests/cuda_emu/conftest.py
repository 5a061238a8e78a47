"""Fixtures of the emulated-CUDA tests: the twin libraries (built on first use, cached by ninja) and the
emulator settings a test runs under."""
import os

import pytest
import torch

from . import emu_build

# (thread/block order, seed, SM count): every order and the SM counts 1, 4 and 132 all appear.
SETTINGS = [("forward", 0, 132), ("reverse", 0, 4), ("random", 1, 1), ("random", 7, 132)]
SETTING_IDS = ["%s%s-sm%d" % (o, "" if o != "random" else s, n) for o, s, n in SETTINGS]


def apply_setting(monkeypatch, order="forward", seed=0, sm_count=132, strict=True, fresh_blocks=False):
    """Emulator settings are environment variables read at every launch (putenv reaches the C side)."""
    monkeypatch.setenv("QK_EMU_ORDER", order)
    monkeypatch.setenv("QK_EMU_SEED", str(seed))
    monkeypatch.setenv("QK_EMU_SM_COUNT", str(sm_count))
    monkeypatch.setenv("QK_EMU_STRICT", "1" if strict else "0")
    monkeypatch.setenv("QK_EMU_FRESH_BLOCKS", "1" if fresh_blocks else "0")


@pytest.fixture(params=SETTINGS, ids=SETTING_IDS)
def emu_setting(request, monkeypatch):
    order, seed, sms = request.param
    apply_setting(monkeypatch, order, seed, sms)
    return request.param


@pytest.fixture(autouse=True)
def _default_setting(monkeypatch):
    for name in ("QK_EMU_ORDER", "QK_EMU_SEED", "QK_EMU_SM_COUNT", "QK_EMU_STRICT", "QK_EMU_FRESH_BLOCKS",
                 "QK_EMU_WORKERS"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def emu():
    """torch.ops.qkernels_emu: csrc/cuda/*.cu on the emulator."""
    return emu_build.qkernels_emu()


@pytest.fixture(scope="session")
def selftest():
    """torch.ops.qk_emu_selftest: the emulator's own semantics kernels."""
    return emu_build.build_library("qk_emu_selftest", [emu_build.EMU_DIR / "selftest_kernels.cu"], twin_of=None)
