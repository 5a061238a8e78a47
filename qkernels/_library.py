"""Loads the compiled operator library once, with a message that says how to build it."""
import torch

try:
    from . import _C  # noqa: F401  (importing registers torch.ops.qkernels.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "qkernels: the compiled kernels (qkernels._C) are missing or do not match this torch "
        "(%s). Build them with `make install` (or `pip install --no-build-isolation .`)." % exc
    ) from exc

ops = torch.ops.qkernels


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
