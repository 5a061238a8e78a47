"""Build qkernels: C++ CPU kernels always, CUDA kernels when torch and a CUDA toolkit allow it.

Environment switches:
  QKERNELS_CPU_ONLY=1        skip CUDA even where it could be built (fast edit-compile loops)
  TORCH_CUDA_ARCH_LIST       GPU architectures; defaults to "9.0" (Hopper) when no GPU is visible
  MAX_JOBS                   parallel compile jobs (ninja)
"""
import glob
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _toolkit_from_nvcc(nvcc):
    """Return the CUDA toolkit root behind an nvcc, following wrapper scripts that exec the real one."""
    nvcc = os.path.realpath(nvcc)
    try:
        with open(nvcc, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if head.startswith(b"#!"):
        match = re.search(rb"(/\S+)/bin/nvcc\b", head)
        return match.group(1).decode() if match else None
    return os.path.dirname(os.path.dirname(nvcc))


def find_cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_from_nvcc(nvcc)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return os.path.realpath("/usr/local/cuda")
    return None


def cuda_wheel_includes():
    """Headers (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include and that ship in the nvidia wheels."""
    found = []
    for base in sys.path:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
    return found[:1]


def want_cuda(torch):
    if os.environ.get("QKERNELS_CPU_ONLY", "0") not in ("", "0"):
        return False, "QKERNELS_CPU_ONLY is set"
    if not torch.version.cuda:
        return False, "torch is a CPU-only build"
    if find_cuda_home() is None:
        return False, "no CUDA toolkit (nvcc) found"
    return True, "torch %s with CUDA %s" % (torch.__version__, torch.version.cuda)


def make_extension():
    import torch

    with_cuda, why = want_cuda(torch)
    if with_cuda:
        # cpp_extension reads CUDA_HOME once, when it is imported.
        os.environ["CUDA_HOME"] = find_cuda_home()
        if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"
    from torch.utils import cpp_extension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True))
    # -fno-trapping-math lets GCC vectorise the clamp/round selects (no op relies on FP exceptions).
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]
    extra = {"cxx": cxx_flags}
    macros = []
    include_dirs = [os.path.join(HERE, "csrc")]
    kind = cpp_extension.CppExtension
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        macros.append(("QKERNELS_WITH_CUDA", "1"))
        include_dirs += cuda_wheel_includes()
        extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        kind = cpp_extension.CUDAExtension
    print(
        "qkernels build: cuda=%s (%s); CUDA_HOME=%s; TORCH_CUDA_ARCH_LIST=%s; sources=%d"
        % (with_cuda, why, os.environ.get("CUDA_HOME", "-"), os.environ.get("TORCH_CUDA_ARCH_LIST", "-"),
           len(sources)),
        flush=True,
    )
    ext = kind(
        "qkernels._C",
        sources,
        depends=depends,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )
    return ext, cpp_extension.BuildExtension


ext, build_ext = make_extension()

setup(
    name="qkernels",
    version="0.1.0",
    description="Quantization-aware training and real int8 inference kernels for PyTorch",
    packages=find_packages(include=["qkernels", "qkernels.*", "ssd", "ssd.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext.with_options(use_ninja=True)},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy"],
)
