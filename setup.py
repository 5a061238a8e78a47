"""Build qkernels: C++ CPU kernels always, CUDA kernels when torch and a CUDA toolkit allow it.

Environment switches:
  QKERNELS_CPU_ONLY=1        skip CUDA even where it could be built (fast edit-compile loops)
  TORCH_CUDA_ARCH_LIST       GPU architectures; defaults to "9.0" (Hopper) when no GPU is visible
  MAX_JOBS                   parallel compile jobs (ninja)

Every build writes qkernels/_build_info.json next to the extension (torch, CUDA and architectures it
was compiled for), which qkernels reads to explain an extension that does not fit the running torch.
"""
import filecmp
import glob
import json
import os
import re
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO_NAME = "_build_info.json"  # read by qkernels/_library.py


def read_version():
    """The version is written once, in qkernels/_version.py; read as text (importing qkernels needs a build)."""
    with open(os.path.join(HERE, "qkernels", "_version.py")) as f:
        return re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


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


def cuda_archs(cpp_extension):
    """The architectures nvcc compiles for: sm_XY (machine code), compute_XY (PTX, compiled on load)."""
    try:
        flags = cpp_extension._get_cuda_arch_flags()  # what BuildExtension passes to nvcc
    except Exception:  # a private helper: record the request if it moves or refuses the list
        return ["TORCH_CUDA_ARCH_LIST=" + os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    return sorted({m for f in flags for m in re.findall(r"code=((?:sm|compute)_\w+)", f)})


def build_record(torch, cpp_extension, with_cuda, why):
    """What qkernels/_build_info.json says about the build; the compiled library adds what only it knows."""
    return {
        "qkernels_version": read_version(),
        "torch_version": torch.__version__,
        "torch_cuda_version": torch.version.cuda,
        "torch_git_version": getattr(torch.version, "git_version", None),
        "python_version": "%d.%d" % sys.version_info[:2],
        "with_cuda": with_cuda,
        "cuda_reason": why,
        "cuda_archs": cuda_archs(cpp_extension) if with_cuda else [],
    }


def make_build_ext(base, record):
    class BuildExt(base):
        """torch's BuildExtension plus: the build record written next to the extension, an editable
        install that reuses the checkout's build folders (so ninja skips what is up to date instead of
        recompiling in a fresh temporary folder), and in-place copies that replace the library
        atomically (a process that has the old one loaded keeps its file)."""

        def finalize_options(self):
            super().finalize_options()
            if self.editable_mode:  # pip install -e: setuptools points both at temporary folders
                tag = ".%s-%s" % (sysconfig.get_platform(), sys.implementation.cache_tag)
                self.build_temp = os.path.join(HERE, "build", "temp" + tag)
                self.build_lib = os.path.join(HERE, "build", "lib" + tag)

        def built_path(self, ext, name=None):
            """Where run() builds ext (build_lib, also for --inplace, which copies it afterwards)."""
            path = os.path.join(self.build_lib, self.get_ext_filename(self.get_ext_fullname(ext.name)))
            return os.path.join(os.path.dirname(path), name) if name else path

        def build_extension(self, ext):
            super().build_extension(ext)
            path = self.built_path(ext, BUILD_INFO_NAME)
            text = json.dumps(record, indent=1, sort_keys=True) + "\n"
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)

        def copy_extensions_to_source(self):
            for ext in self.extensions:
                package_dir = os.path.join(HERE, *ext.name.split(".")[:-1])
                for src in (self.built_path(ext), self.built_path(ext, BUILD_INFO_NAME)):
                    dst = os.path.join(package_dir, os.path.basename(src))
                    # BuildExtension relinks on every run; an identical result leaves the file (and
                    # the processes that have it loaded) alone.
                    if os.path.exists(dst) and filecmp.cmp(src, dst, shallow=False):
                        continue
                    tmp = dst + ".tmp%d" % os.getpid()
                    shutil.copy2(src, tmp)
                    os.replace(tmp, dst)

        def get_outputs(self):
            return super().get_outputs() + [self.built_path(ext, BUILD_INFO_NAME) for ext in self.extensions]

    return BuildExt.with_options(use_ninja=True)


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
    depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
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
    record = build_record(torch, cpp_extension, with_cuda, why)
    print(
        "qkernels build: cuda=%s (%s); CUDA_HOME=%s; TORCH_CUDA_ARCH_LIST=%s (%s); sources=%d"
        % (with_cuda, why, os.environ.get("CUDA_HOME", "-"), os.environ.get("TORCH_CUDA_ARCH_LIST", "-"),
           " ".join(record["cuda_archs"]) or "-", len(sources)),
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
    return ext, make_build_ext(cpp_extension.BuildExtension, record), torch.__version__.split("+")[0]


ext, build_ext, ext_torch_release = make_extension()

setup(
    name="qkernels",
    version=read_version(),
    description="Quantization-aware training and real int8 inference kernels for PyTorch",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["qkernels", "qkernels.*", "ssd", "ssd.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    entry_points={"console_scripts": ["qkernels-ssd = ssd.main_quant:main"]},
    python_requires=">=3.9",
    # The compiled kernels fit the torch release they were built against, and only that one.
    install_requires=["torch==%s" % ext_torch_release, "numpy", "pillow", "tqdm"],
    extras_require={"demo": ["matplotlib"]},
)
