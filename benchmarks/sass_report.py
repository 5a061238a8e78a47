"""What the compiled CUDA kernels are made of, read from the built extension without a GPU.

`cuobjdump -sass` and `cuobjdump -res-usage` (the nvidia-cuda-cuobjdump wheel, or a toolkit's) on
qkernels/_C*.so give, per kernel: registers, stack frame, static shared memory, local memory, and the
SASS instruction mix (full opcodes such as LDG.E.128, IMMA.16832.S8.S8, LDGSTS.E.BYPASS.128). Local-memory
traffic (STL/LDL) means register spills.

    python -m benchmarks.sass_report [--so PATH] [--out-dir benchmarks/results]   # make sass-report

writes sass-<arch>.md and .json; tests/test_sass.py asserts what the kernels' designs need.
"""
import argparse
import collections
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

# Instruction families shown as columns of the report (opcode prefixes).
FAMILIES = [
    ("LDG.128", r"^LDG\..*128"), ("LDG", r"^LDG"), ("STG.128", r"^STG\..*128"), ("STG", r"^STG"),
    ("LDGSTS", r"^LDGSTS"), ("LDS", r"^LDS"), ("LDSM", r"^LDSM"), ("STS", r"^STS"),
    ("IMMA", r"^IMMA"), ("HMMA", r"^HMMA"), ("HGMMA/IGMMA", r"^(HGMMA|IGMMA)"), ("IDP4A", r"^IDP\.4A"),
    ("FFMA", r"^FFMA"), ("SHFL", r"^SHFL"), ("BAR", r"^BAR"), ("ATOM/RED", r"^(ATOM|RED)"),
    ("LDL/STL", r"^(LDL|STL)"), ("I2F/F2I", r"^(I2F|F2I)"),
]


def find_cuobjdump() -> Optional[str]:
    """cuobjdump from the nvidia-cuda-cuobjdump wheel next to this Python, a CUDA_HOME, or PATH."""
    for base in sys.path:
        cand = os.path.join(base, "nvidia", "cu13", "bin", "cuobjdump")
        if os.access(cand, os.X_OK):
            return cand
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.access(os.path.join(root, "bin", "cuobjdump"), os.X_OK):
            return os.path.join(root, "bin", "cuobjdump")
    return shutil.which("cuobjdump")


def built_extension() -> Optional[str]:
    found = sorted(glob.glob(str(REPO / "qkernels" / "_C*.so")))
    return found[0] if found else None


def demangle(names: List[str]) -> Dict[str, str]:
    filt = shutil.which("c++filt")
    if not filt or not names:
        return {n: n for n in names}
    out = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


def short_name(demangled: str) -> str:
    """`qkernels::(anonymous namespace)::abs_max_kernel<float>(float const*, long, unsigned int*)` ->
    `abs_max_kernel<float>`: the kernel and its template arguments."""
    name = demangled[5:] if demangled.startswith("void ") else demangled
    depth, cut = 0, len(name)
    for i, c in enumerate(name):  # drop the parameter list (the first '(' outside template brackets)
        if c == "<":
            depth += 1
        elif c == ">":
            depth -= 1
        elif c == "(" and depth == 0 and not name.startswith("(anonymous", i):
            cut = i
            break
    name = name[:cut]
    for prefix in ("qkernels::(anonymous namespace)::", "qkernels::"):
        name = name.replace(prefix, "")
    return name


def parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    usage, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            usage[current] = {k.lower(): int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            current = None
    return usage


def parse_sass(text: str) -> Dict[str, collections.Counter]:
    mixes, current = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            mixes[current] = collections.Counter()
            continue
        m = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", line)
        if m and current:
            mixes[current][m.group(1)] += 1
    return mixes


def family_counts(mix: collections.Counter) -> Dict[str, int]:
    out = {}
    for fam, pattern in FAMILIES:
        rx = re.compile(pattern)
        out[fam] = sum(n for op, n in mix.items() if rx.search(op))
    return out


def kernel_report(so_path: str, cuobjdump: Optional[str] = None) -> Dict[str, Dict]:
    """{short kernel name: {"mangled", "demangled", "arch", "reg", "stack", "shared", "local", "mix",
    "families", "instructions"}} for every kernel in the extension's fatbinary."""
    tool = cuobjdump or find_cuobjdump()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found: install the nvidia-cuda-cuobjdump wheel (requirements.txt)")
    sass = subprocess.run([tool, "-sass", so_path], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", so_path], capture_output=True, text=True, check=True).stdout
    arches = set(re.findall(r"arch = (sm_\d+a?)", sass))
    mixes, usage = parse_sass(sass), parse_resource_usage(res)
    names = demangle(list(mixes))
    report = {}
    for mangled, mix in mixes.items():
        short = short_name(names[mangled])
        report[short] = {"mangled": mangled, "demangled": names[mangled], "arch": ",".join(sorted(arches)),
                         **usage.get(mangled, {}), "instructions": sum(mix.values()),
                         "families": family_counts(mix), "mix": dict(mix.most_common())}
    return report


def to_markdown(report: Dict[str, Dict], so_path: str) -> str:
    fams = [f for f, _ in FAMILIES]
    lines = ["# SASS report: %s" % Path(so_path).name, "",
             "Per kernel of the built extension (`python -m benchmarks.sass_report`): registers, stack frame, "
             "static shared memory and local memory (bytes) from `cuobjdump -res-usage`, then SASS instruction "
             "counts by family (static counts in the code, not executed counts). LDL/STL are register spills.",
             "", "| kernel | arch | regs | stack | shared | local | instrs | " + " | ".join(fams) + " |",
             "|" + "---|" * (7 + len(fams))]
    for name in sorted(report):
        r = report[name]
        lines.append("| %s | %s | %s | %s | %s | %s | %d | %s |" % (
            name.replace("|", "\\|"), r["arch"], r.get("reg", "-"), r.get("stack", "-"), r.get("shared", "-"),
            r.get("local", "-"), r["instructions"], " | ".join(str(r["families"][f]) for f in fams)))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--so", default=None, help="the extension to inspect (default: qkernels/_C*.so)")
    parser.add_argument("--out-dir", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    so = args.so or built_extension()
    if so is None:
        parser.error("no built extension: run `make build` first")
    report = kernel_report(so)
    if not report:
        parser.error("%s holds no CUDA kernels (a CPU-only build?)" % so)
    arch = sorted({r["arch"] for r in report.values()})[0]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / ("sass-%s.md" % arch), out / ("sass-%s.json" % arch)
    md.write_text(to_markdown(report, so))
    js.write_text(json.dumps(report, indent=1, sort_keys=True) + "\n")
    print(to_markdown(report, so))
    print("written: %s and %s" % (md, js))
    return 0


if __name__ == "__main__":
    sys.exit(main())
