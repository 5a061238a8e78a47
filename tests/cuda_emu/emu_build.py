"""Builds CUDA sources as host C++ on the CUDA emulator and loads them as a twin op library.

The CUDA files are compiled unchanged except for a pre-pass that rewrites only the two constructs host
C++ cannot parse:
- ``kernel<<<grid, block, shared, stream>>>(args)`` becomes
  ``::qk_emu::launch(__FILE__, __LINE__, "kernel", kernel, grid, block, shared, stream)(args)``;
- ``extern __shared__ T name[];`` becomes ``T* name = ::qk_emu::dynamic_shared<T>();``.
Everything else (``__global__``, ``__shared__``, ``threadIdx``, intrinsics, the ATen CUDA headers) is
supplied by ``include/``: the force-included ``qk_emu/prelude.h`` and stand-ins for the CUDA headers.

``TORCH_LIBRARY_IMPL(qkernels, CUDA, m)`` in those files registers the kernels as the CPU kernels of a
twin library (``qkernels_emu``) whose schemas are copied from ``torch.ops.qkernels``, so a test calls
``torch.ops.qkernels_emu.X`` on CPU tensors and compares with ``torch.ops.qkernels.X``.

Compiled with ``-mfma -ffp-contract=fast`` so ``a*b + c`` fuses into one FMA as nvcc does by default (the
CPU kernels keep their own flags). Built on demand by the tests, cached by ninja under build/cuda_emu/;
never part of the user's install.
"""
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

EMU_DIR = Path(__file__).resolve().parent
REPO_ROOT = EMU_DIR.parents[1]
CSRC = REPO_ROOT / "csrc"
BUILD_ROOT = REPO_ROOT / "build" / "cuda_emu"

_LIBRARIES = {}  # namespace -> torch.library.Library holding the copied schemas (kept alive)


# --- the pre-pass --------------------------------------------------------------------------------------

def _blank_comments_and_strings(text: str) -> str:
    """The text with comments and string/char literals replaced by spaces (newlines kept), so token
    searches see code only; positions are those of the original."""
    out = list(text)
    i, n = 0, len(text)

    def blank(a, b):
        for k in range(a, b):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        if text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            blank(i, j)
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            blank(i, j)
            i = j
        elif text.startswith('R"', i) and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            open_paren = text.find("(", i + 2)
            delim = text[i + 2:open_paren]
            j = text.find(")" + delim + '"', open_paren)
            j = n if j < 0 else j + len(delim) + 2
            blank(i, j)
            i = j
        elif text[i] in "\"'":
            quote, j = text[i], i + 1
            while j < n and text[j] != quote and text[j] != "\n":
                j += 2 if text[j] == "\\" else 1
            blank(i, min(j + 1, n))
            i = j + 1
        else:
            i += 1
    return "".join(out)


def _launch_end(code: str, start: int) -> int:
    """Index of the ``>>>`` closing the configuration that starts at ``start``."""
    depth = 0
    i = start
    while i < len(code):
        c = code[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and code.startswith(">>>", i):
            return i
        i += 1
    raise ValueError("qk_emu pre-pass: a kernel launch '<<<' has no closing '>>>'")


def _callee_start(code: str, end: int) -> int:
    """Start of the kernel expression that ends at ``end`` (``ns::kernel<T, 4>``)."""
    k = end
    while True:
        while k > 0 and code[k - 1].isspace():
            k -= 1
        if k > 0 and code[k - 1] == ">":  # template arguments
            depth = 0
            k -= 1
            while k >= 0:
                if code[k] == ">":
                    depth += 1
                elif code[k] == "<":
                    depth -= 1
                    if depth == 0:
                        break
                k -= 1
            while k > 0 and code[k - 1].isspace():
                k -= 1
        ident_end = k
        while k > 0 and (code[k - 1].isalnum() or code[k - 1] == "_"):
            k -= 1
        if k == ident_end:
            raise ValueError("qk_emu pre-pass: cannot find the kernel name before '<<<'")
        if k >= 2 and code[k - 2:k] == "::":
            k -= 2
            continue
        return k


_EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?(?P<type>[A-Za-z_][\w:<>,\s]*?[\w>])\s*"
    r"(?:__align__\s*\(\s*\d+\s*\)\s*)?(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*(?:__align__\s*\(\s*\d+\s*\)\s*)?;")


def rewrite_cuda_source(text: str) -> str:
    """Apply the pre-pass; line numbers are kept so __FILE__/__LINE__ and compiler errors point at the
    original source."""
    code = _blank_comments_and_strings(text)
    edits = []  # (start, end, replacement)
    pos = 0
    while True:
        j = code.find("<<<", pos)
        if j < 0:
            break
        end = _launch_end(code, j + 3)
        k = _callee_start(code, j)
        callee = text[k:j].strip()
        name = " ".join(callee.split()).replace("\\", "\\\\").replace('"', '\\"')
        config = text[j + 3:end]
        edits.append((k, end + 3, '::qk_emu::launch(__FILE__, __LINE__, "%s", %s, %s)' % (name, callee, config)))
        pos = end + 3
    for m in _EXTERN_SHARED.finditer(code):
        decl = text[m.start():m.end()]
        t, name = m.group("type").strip(), m.group("name")
        replacement = "%s* %s = ::qk_emu::dynamic_shared<%s>();" % (" ".join(t.split()), name, " ".join(t.split()))
        edits.append((m.start(), m.end(), replacement + "\n" * decl.count("\n")))
    edits.sort()
    out, last = [], 0
    for a, b, rep in edits:
        if a < last:
            raise ValueError("qk_emu pre-pass: overlapping rewrites at offset %d" % a)
        out.append(text[last:a])
        # keep the line count: a launch written over several lines keeps its newlines at the end
        removed_newlines = text[a:b].count("\n") - rep.count("\n")
        out.append(rep + "\n" * max(0, removed_newlines))
        last = b
    out.append(text[last:])
    return "".join(out)


# --- building and loading ----------------------------------------------------------------------------------

def _write_if_changed(path: Path, content: str) -> None:
    if not path.exists() or path.read_text() != content:
        path.write_text(content)


def _copy_schemas(namespace: str, source_namespace: str) -> None:
    if namespace in _LIBRARIES:
        return
    import qkernels  # noqa: F401  (registers the source schemas)

    lib = torch.library.Library(namespace, "FRAGMENT")
    prefix = source_namespace + "::"
    count = 0
    for schema in torch._C._jit_get_all_schemas():
        if schema.name.startswith(prefix):
            lib.define(str(schema)[len(prefix):])
            count += 1
    if count == 0:
        raise RuntimeError("qk_emu: no %s ops are registered to copy" % source_namespace)
    _LIBRARIES[namespace] = lib


def build_library(namespace: str, cuda_sources: Iterable[os.PathLike], *,
                  transform: Optional[Callable[[Path, str], str]] = None,
                  extra_sources: Iterable[os.PathLike] = (),
                  twin_of: Optional[str] = "qkernels", verbose: bool = False):
    """Compile ``cuda_sources`` on the emulator into the op namespace ``namespace`` and load it.

    ``transform(path, text)`` may edit a source before the pre-pass (tests use it to break a kernel on
    purpose); ``twin_of`` names the library whose schemas the kernels implement (None: the sources
    define their own schemas). Returns ``torch.ops.<namespace>``."""
    build_dir = BUILD_ROOT / namespace
    generated = build_dir / "generated"
    generated.mkdir(parents=True, exist_ok=True)
    sources = []
    for src in cuda_sources:
        src = Path(src).resolve()
        text = src.read_text()
        if transform is not None:
            text = transform(src, text)
        target = generated / (src.stem + ".cpp")
        _write_if_changed(target, '#line 1 "%s"\n' % src + rewrite_cuda_source(text))
        sources.append(str(target))
    sources += [str(EMU_DIR / "src" / "runtime.cpp"), str(EMU_DIR / "src" / "control_ops.cpp")]
    sources += [str(Path(s).resolve()) for s in extra_sources]
    if twin_of is not None:
        _copy_schemas(namespace, twin_of)
    from torch.utils import cpp_extension

    cpp_extension.load(
        name=namespace,
        sources=sources,
        # nvcc fuses a*b + c by default; so does GCC with FMA3 and -ffp-contract=fast
        extra_cflags=["-O2"] + (["-mfma", "-ffp-contract=fast"] if host_has_fma() else []) + ["-Wno-unknown-pragmas",
                      "-include", str(EMU_DIR / "include" / "qk_emu" / "prelude.h"),
                      "-DQK_EMU_LIB=%s" % namespace],
        extra_include_paths=[str(EMU_DIR / "include"), str(CSRC), str(CSRC / "cuda")],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=verbose,
    )
    return getattr(torch.ops, namespace)


def host_has_fma() -> bool:
    """Whether this processor has FMA3, which -mfma (nvcc-like contraction) needs."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " fma " in line + " " for line in f)
    except OSError:
        return False


def qkernels_cuda_sources():
    return sorted((CSRC / "cuda").glob("*.cu"))


def qkernels_emu(verbose: bool = False):
    """The twin of torch.ops.qkernels built from csrc/cuda/*.cu: ``torch.ops.qkernels_emu``."""
    return build_library("qkernels_emu", qkernels_cuda_sources(), extra_sources=[CSRC / "int8_checks.cpp"],
                         verbose=verbose)
