"""Shared test fixtures: the devices to run on and the shared data folder beside the checkout."""
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _shared_dir(repo: Path) -> Path:
    """``../shared`` beside the checkout, or beside a folder above it (a worktree under wt/)."""
    for parent in repo.parents:
        if (parent / "shared").is_dir():
            return parent / "shared"
    return repo.parent / "shared"


SHARED_DIR = _shared_dir(REPO_ROOT)

# `python -m pytest` already puts the working directory on sys.path; this makes a bare `pytest` run
# from anywhere import the in-place build too.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CUDA_AVAILABLE = torch.cuda.is_available()
NEEDS_CUDA_REASON = "needs a CUDA device"
needs_cuda = pytest.mark.skipif(not CUDA_AVAILABLE, reason=NEEDS_CUDA_REASON)


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (benchmarks/gpu_check.sh runs `-m cuda`)")


def pytest_collection_modifyitems(config, items):
    # Every test that needs_cuda marks (directly or through a parameter) is selectable as `-m cuda`.
    for item in items:
        if any(m.name == "skipif" and m.kwargs.get("reason") == NEEDS_CUDA_REASON for m in item.iter_markers()):
            item.add_marker(pytest.mark.cuda)

# CPU always; CUDA only where a GPU is visible. A GPU with a CPU-only build of qkernels fails on
# purpose (check_backend names the problem) rather than skipping silently.
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


@pytest.fixture
def shared_data_dir():
    path = SHARED_DIR / "data"
    if not path.is_dir():
        pytest.skip("shared data folder %s is absent" % path)
    return path
