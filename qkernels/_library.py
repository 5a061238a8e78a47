"""Loads the compiled operator library once. When it does not load, one sentence says why (not built,
built for another Python, or built against another torch, read from the build record that setup.py
writes next to it) and how to rebuild, instead of the loader's undefined-symbol traceback."""
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings

import torch

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
BUILD_RECORD_PATH = os.path.join(PACKAGE_DIR, "_build_info.json")  # setup.py's BUILD_INFO_NAME
REBUILD_HINT = (
    "rebuild qkernels for the running torch: `make install` in a source checkout, "
    "`pip install --no-build-isolation .` from the source, or a wheel built against this torch"
)


def read_build_record() -> dict:
    """What setup.py recorded about the build (torch, CUDA, architectures); {} when absent or unreadable."""
    try:
        with open(BUILD_RECORD_PATH) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def torch_label(version, cuda) -> str:
    return "%s (%s)" % (version, "CUDA %s" % cuda if cuda else "CPU-only")


def torch_mismatch(record: dict):
    """'built against torch A but torch B is running' when the record names another torch, else None."""
    built = record.get("torch_version")
    if not built or (built == torch.__version__ and record.get("torch_cuda_version") == torch.version.cuda):
        return None
    return "were built against torch %s but torch %s is running" % (
        torch_label(built, record.get("torch_cuda_version")), torch_label(torch.__version__, torch.version.cuda))


def _release(version: str) -> str:
    return version.split("+")[0]


def _extension_path():
    """This package's own build of _C for this Python, or None."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(PACKAGE_DIR, "_C" + suffix)
        if os.path.exists(path):
            return path
    return None


def load_failure_message(exc: ImportError) -> str:
    """One sentence on why qkernels._C did not import, and what to do."""
    where = "the compiled kernels in %s" % PACKAGE_DIR
    if _extension_path() is None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        others = sorted(f for f in os.listdir(PACKAGE_DIR) if f.startswith("_C.") and f.endswith(".so"))
        if others:
            return "qkernels: %s were built for another Python (found %s; this Python loads _C%s); %s." % (
                where, ", ".join(others), suffix, REBUILD_HINT)
        return ("qkernels: %s are not built (no qkernels/_C%s); build them with `make install` in a source "
                "checkout or `pip install --no-build-isolation .`, or install a qkernels wheel." % (where, suffix))
    loader = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    mismatch = torch_mismatch(read_build_record())
    if mismatch:
        return "qkernels: %s %s; %s (the loader said: %s)." % (where, mismatch, REBUILD_HINT, loader)
    return "qkernels: %s did not load (%s); if torch changed since they were built, %s." % (
        where, loader, REBUILD_HINT)


def _load_extension():
    """Imports qkernels._C from this package's folder and nowhere else: with a .venv shared by checkouts,
    the editable install's import hook would otherwise lend another checkout's build to one that has none."""
    path = _extension_path()
    if path is None:
        raise ImportError("no qkernels._C in %s" % PACKAGE_DIR)
    spec = importlib.util.spec_from_file_location(__package__ + "._C", path)
    module = importlib.util.module_from_spec(spec)  # loads the library: registers torch.ops.qkernels.*
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    setattr(sys.modules[__package__], "_C", module)
    return module


try:
    _C = _load_extension()
except ImportError as exc:
    raise ImportError(load_failure_message(exc)) from None

ops = torch.ops.qkernels


def _warn_on_torch_mismatch() -> None:
    """It loaded, but a build for another torch can still crash or misbehave later: say so once."""
    record = read_build_record()
    mismatch = torch_mismatch(record)
    headers = _C.build_info()["torch_headers"]
    if not mismatch and _release(headers) != _release(torch.__version__):
        mismatch = "were compiled with torch %s headers but torch %s is running" % (headers, torch.__version__)
    if mismatch:
        warnings.warn("qkernels: the compiled kernels in %s %s; %s." % (PACKAGE_DIR, mismatch, REBUILD_HINT),
                      RuntimeWarning, stacklevel=2)


_warn_on_torch_mismatch()

# Read once: a plain bool is traceable by torch.compile, a call into the C module is not.
_HAS_CUDA_KERNELS = bool(_C.has_cuda_kernels())


def has_cuda_kernels() -> bool:
    """Whether this build of qkernels contains CUDA kernels."""
    return _HAS_CUDA_KERNELS


def check_backend(x: torch.Tensor) -> None:
    """Raise a clear error for a CUDA tensor on a CPU-only build (instead of a dispatcher error)."""
    if x.is_cuda and not _HAS_CUDA_KERNELS:
        raise RuntimeError(
            "qkernels was built without CUDA kernels, so it cannot run on %s. Rebuild it where nvcc "
            "and a CUDA build of torch are present (and QKERNELS_CPU_ONLY is unset)." % x.device
        )


def check_same_device(x: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every named tensor must live on x's device. Checked here too because a tensor on the meta
    device would route the call to the fake kernel and skip the C++ checks."""
    for name, t in tensors.items():
        if t.device != x.device:
            raise RuntimeError("qkernels: %s is on %s but the input is on %s" % (name, t.device, x.device))
