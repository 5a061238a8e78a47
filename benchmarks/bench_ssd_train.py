"""MobileNet-SSD training throughput of the command line (`python -m ssd.main_quant --mode train`) on CPU,
with glibc malloc keeping freed memory (`--malloc keep`, the default: mallopt M_MMAP_THRESHOLD /
M_TRIM_THRESHOLD 1 GiB, M_TOP_PAD 64 MiB) against the system's malloc settings (`--malloc system`).

Each run is a fresh process training 2 epochs on a generated data set (full reference augmentation,
batch 8, one loader worker); the second epoch's images/s counts (the first includes start-up). Float32
and QAT (abs_max, from the float run's weights) runs alternate keep / system, so that load from other
jobs hits both alike. Cells: seconds per training image (the median over repeats); in brackets the
system setting's time / ours (above 1: keeping freed memory is faster).
"""
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import common

SCRIPT = "bench_ssd_train"
MODES = ("keep", "system")


def train(data_dir: Path, save_dir: Path, malloc: str, extra: list) -> tuple[float, int]:
    """Seconds per image in the second epoch of a fresh training process, and the minor page faults of
    the whole run (its loader worker included): a count that does not depend on the machine's load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    cmd = [sys.executable, "-m", "ssd.main_quant", "--mode", "train", "--data_dir", str(data_dir),
           "--model_save_dir", str(save_dir), "--batch_size", "8", "--num_workers", "1", "--epoc_num", "2",
           "--learning_rate", "0.001", "--quiet", "--use_gpu", "false", "--malloc", malloc, *extra]
    proc = subprocess.run(cmd, cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed")
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    history = torch.load(save_dir / "last.pt", weights_only=True)["history"]
    return 1.0 / history[-1]["images_per_s"], faults


def main() -> None:
    parser = common.arg_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=None, help="runs per setting (default 2, --quick 1)")
    args = parser.parse_args()
    device, env = common.setup(args)
    if device.type != "cpu":
        raise SystemExit("bench_ssd_train measures the CPU allocator; run it with --device cpu")
    repeats = args.repeats or (1 if args.quick else 2)
    images = 32 if args.quick else 64
    from ssd.data import synthetic

    section = common.Section("ssd_train_malloc", "MobileNet-SSD training on CPU: glibc malloc keeping freed memory",
                             ours_label="--malloc keep")
    section.notes.append(f"{images} generated training images, batch 8, 2 epochs per run (the 2nd timed), "
                         f"{repeats} run(s) per setting, interleaved; per-image times.")
    with tempfile.TemporaryDirectory(prefix="bench_ssd_train_") as tmp:
        root = Path(tmp)
        data = synthetic.generate(root / "data", seed=0, train=images, test=8)
        runs = {"float32": ["--act_quant_type", "none"],
                "QAT abs_max": ["--act_quant_type", "abs_max", "--init_model", str(root / "float32-keep-0" / "last.pt")]}
        for case, extra in runs.items():
            times = {mode: [] for mode in MODES}
            faults = {mode: [] for mode in MODES}
            errors = {}
            for r in range(repeats):
                for mode in MODES:
                    try:
                        seconds, count = train(data, root / f"{case.split()[0]}-{mode}-{r}", mode, extra)
                        times[mode].append(seconds)
                        faults[mode].append(count)
                    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                        errors[mode] = common.error_text(exc)
            if all(faults.values()):
                section.notes.append(f"{case}: minor page faults per run (median) "
                                     + ", ".join(f"{m} {statistics.median(faults[m]) / 1e3:.0f}k" for m in MODES)
                                     + ".")
            timing = {}
            for mode in MODES:
                if times[mode]:
                    timing[mode] = common.Timing(median_s=statistics.median(times[mode]),
                                                 min_s=min(times[mode]), samples=len(times[mode]), calls_per_sample=1)
                else:
                    timing[mode] = common.Timing(error=errors.get(mode, "no run"))
            section.add_row(case, timing["keep"], {"--malloc system": timing["system"]})
    common.publish(SCRIPT, [section], args, device, env)


if __name__ == "__main__":
    main()
