"""Scaling with problem size: fake_quant_abs_max (float32) from 1K to 64M elements (powers of 4), ours
against PyTorch eager and a copy. Small sizes show per-call (launch and dispatch) overhead, large ones
memory bandwidth: GB/s counts one read and one write of 4-byte elements.

Hook for batch-size sweeps: any benchmarks/bench_*.py module that defines
    batch_scaling(device: torch.device, quick: bool) -> list[common.Section]
has those sections appended here (e.g. int8 conv and SSD inference over batch sizes BATCH_SIZES).
A module that fails to import or raises is recorded, not fatal.
"""
import importlib
import traceback
from pathlib import Path

import torch

import qkernels
from qkernels.reference import eager_fake_quant_abs_max

from . import common

SCRIPT = "bench_scaling"
SIZES = [4**k for k in range(5, 14)]  # 1K .. 64M
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # for the batch_scaling hooks


def size_label(n: int) -> str:
    for unit, div in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= div:
            return "%d%s" % (n // div, unit)
    return str(n)


def size_section(device, quick) -> common.Section:
    sec = common.Section("fake_quant_abs_max_by_size", "fake_quant_abs_max forward by tensor size, float32",
                         bandwidth_ref="copy",
                         notes=["Inputs rotate over a few buffers (at least 64 MiB in all, up to 8 buffers) so "
                                "sizes that fit in cache are not timed hot."])
    for n in SIZES:
        xs = common.rotating(lambda: torch.randn(n, device=device), common.buffer_count(4 * n))
        t = common.measure_group({"ours": lambda x: qkernels.fake_quant_abs_max(x, 8),
                                  "eager": eager_fake_quant_abs_max, "copy": lambda x: x.clone()},
                                 xs, device, quick=quick)
        ours = t.pop("ours")
        sec.add_row(size_label(n), ours, t, bytes_moved=8 * n)
        del xs
    return sec


def hooked_sections(device, quick):
    """Sections from other bench_*.py modules' batch_scaling(device, quick), or a note of why not."""
    sections, problems = [], []
    for path in sorted(Path(__file__).parent.glob("bench_*.py")):
        if path.stem == SCRIPT:
            continue
        try:
            module = importlib.import_module("benchmarks." + path.stem)
            hook = getattr(module, "batch_scaling", None)
            if hook is not None:
                sections += list(hook(device, quick))
        except Exception as exc:  # one broken module must not hide the others
            problems.append("%s.batch_scaling: %s" % (path.stem, common.error_text(exc)))
            traceback.print_exc()
    return sections, problems


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--no-hooks", action="store_true", help="only the size sweep, no batch_scaling hooks")
    args = parser.parse_args()
    device, env = common.setup(args)
    sections = [size_section(device, args.quick)]
    if not args.no_hooks:
        extra, problems = hooked_sections(device, args.quick)
        sections += extra
        sections[0].notes += ["Batch-size hook failed: " + p for p in problems]
    common.publish(SCRIPT, sections, args, device, env)


if __name__ == "__main__":
    main()
