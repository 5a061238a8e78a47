"""Shared benchmark machinery: timing, result tables, the environment record and result files.

Every bench_*.py script uses it the same way:

    parser = common.arg_parser(__doc__)   # --device cpu|cuda, --quick, --threads, --results-dir, --no-save
    args = parser.parse_args()
    device, env = common.setup(args)      # resolves the device, applies --threads, seeds, records the environment
    xs = common.rotating(lambda: torch.randn(n, device=device), common.buffer_count(4 * n))
    section = common.Section("fake_quant_fwd", "Fake quant forward", bandwidth_ref="copy")
    t = common.measure_group({"ours": op, "eager": eager, "copy": lambda x: x.clone()}, xs, device,
                             quick=args.quick)   # samples interleaved: load changes hit all alike
    ours = t.pop("ours")                           # or common.measure(fn, xs, device) for one callable
    section.add_row("16M", ours, t, bytes_moved=8 * n)
    section.add_target("16M: >= 3x faster than eager", met=..., detail="...")
    common.publish("bench_fake_quant", [section], args, device, env)

Timing is the median of several samples, each a batch of calls long enough to time reliably, after a
warm-up (which also absorbs torch.compile). measure_group interleaves the samples of several callables
so that load from other jobs hits them alike. The device is synchronised around every sample (CUDA
events on a GPU). Calls cycle through a few input buffers so that small inputs are not served from a cache
warmed by the previous call. A peer that raises is recorded with its exception text; the run goes on.

Results go to results/<device>/<script>.json|md (one file pair per script, written atomically) and
are merged into results/<device>.json|md, the file people read.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]

# Inputs are rotated until they span at least this many bytes (a few buffers at most), so a size
# that fits in the last-level cache is not measured hot.
ROTATION_BYTES = 64 << 20
MAX_BUFFERS = 8


# --- timing ----------------------------------------------------------------------------------------

@dataclass
class Timing:
    """Seconds per call. `error` is set (and the times are NaN) when the callable failed or was skipped."""

    median_s: float = math.nan
    min_s: float = math.nan
    samples: int = 0
    calls_per_sample: int = 0
    warmup_s: float = math.nan  # wall time of the first call: includes torch.compile when there is one
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return self.error is None and not math.isnan(self.median_s)


def skipped(reason: str) -> Timing:
    """A Timing for a peer that was not run, with the reason shown in the table."""
    return Timing(error="skipped: " + reason)


def error_text(exc: BaseException, limit: int = 300) -> str:
    """Exception type and message on one line, shortened: the table records why a peer failed."""
    msg = " ".join(str(exc).split())
    text = "%s: %s" % (type(exc).__name__, msg) if msg else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks: --device cuda was asked for, but torch sees no CUDA device")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def buffer_count(bytes_per_input: int) -> int:
    """How many input buffers to rotate through: enough to span ROTATION_BYTES, between 2 and 8."""
    if bytes_per_input <= 0:
        return 2
    return max(2, min(MAX_BUFFERS, math.ceil(ROTATION_BYTES / bytes_per_input)))


def rotating(make: Callable[[], Any], count: int) -> List[Any]:
    """`count` independent inputs from `make()`; measure() calls fn(*input) (or fn(input)) round-robin."""
    return [make() for _ in range(count)]


def _as_args(item) -> tuple:
    return item if isinstance(item, tuple) else (item,)


def _run_sample(fn, inputs, start: int, calls: int, device: torch.device) -> float:
    """Seconds for `calls` calls starting at input `start`, with the device idle before and after."""
    n = len(inputs)
    synchronize(device)
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for i in range(calls):
            fn(*inputs[(start + i) % n])
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    for i in range(calls):
        fn(*inputs[(start + i) % n])
    return time.perf_counter() - t0


def measure(
    fn: Callable,
    inputs: Sequence[Any],
    device: torch.device,
    *,
    quick: bool = False,
    warmup: int = 2,
    repeats: Optional[int] = None,
    min_sample_s: Optional[float] = None,
    max_total_s: Optional[float] = None,
) -> Timing:
    """Median seconds per call of fn over `inputs` (a list of tensors or of argument tuples).

    Never raises for a failing fn: the Timing carries the exception text instead.
    """
    return measure_group({"fn": fn}, inputs, device, quick=quick, warmup=warmup, repeats=repeats,
                         min_sample_s=min_sample_s, max_total_s=max_total_s)["fn"]


class _Candidate:
    """One callable of a group while it is being timed."""

    def __init__(self, fn, inputs, device, warmup, min_sample_s):
        self.fn, self.samples, self.pos = fn, [], 0
        self.first = _run_sample(fn, inputs, 0, 1, device)  # compile, allocator and cache warm-up
        for i in range(1, max(warmup, 2)):  # the last warm-up call also calibrates the batch size
            self.one = _run_sample(fn, inputs, i, 1, device)
        self.pos = max(warmup, 2)
        self.calls = max(1, min(10000, math.ceil(min_sample_s / max(self.one, 1e-7))))

    def sample(self, inputs, device) -> None:
        self.samples.append(_run_sample(self.fn, inputs, self.pos, self.calls, device) / self.calls)
        self.pos += self.calls

    def timing(self) -> Timing:
        return Timing(statistics.median(self.samples), min(self.samples), len(self.samples), self.calls, self.first)


def measure_group(
    fns: Dict[str, Any],
    inputs: Sequence[Any],
    device: torch.device,
    *,
    quick: bool = False,
    warmup: int = 2,
    repeats: Optional[int] = None,
    min_sample_s: Optional[float] = None,
    max_total_s: Optional[float] = None,
) -> Dict[str, Timing]:
    """measure() for several callables on the same inputs, their samples interleaved round-robin so
    that a change in machine load (other jobs on a shared machine) hits all of them alike and their
    ratios stay fair. A value that is already a Timing (e.g. skipped(...)) is passed through.
    `max_total_s` bounds the sampling time of each callable."""
    if not inputs:
        raise ValueError("benchmarks: measure() needs at least one input")
    inputs = [_as_args(item) for item in inputs]
    repeats = repeats if repeats is not None else (7 if quick else 15)
    min_sample_s = min_sample_s if min_sample_s is not None else (2e-3 if quick else 5e-3)
    max_total_s = max_total_s if max_total_s is not None else (1.5 if quick else 4.0)
    results: Dict[str, Timing] = {}
    running: Dict[str, _Candidate] = {}
    for name, fn in fns.items():
        if isinstance(fn, Timing):
            results[name] = fn
            continue
        try:
            running[name] = _Candidate(fn, inputs, device, warmup, min_sample_s)
        except Exception as exc:  # a failing peer is a result, not a crash
            synchronize_quietly(device)
            results[name] = Timing(error=error_text(exc))
    rounds = {n: max(3, min(repeats, int(max_total_s / max(c.one * c.calls, 1e-9)))) for n, c in running.items()}
    for r in range(max(rounds.values(), default=0)):
        for name, cand in list(running.items()):
            if r >= rounds[name]:
                continue
            try:
                cand.sample(inputs, device)
            except Exception as exc:
                synchronize_quietly(device)
                results[name] = Timing(error=error_text(exc))
                del running[name]
    for name, cand in running.items():
        results[name] = cand.timing()
    return {name: results[name] for name in fns}


def synchronize_quietly(device: torch.device) -> None:
    try:
        synchronize(device)
    except Exception:
        pass


# --- result tables ---------------------------------------------------------------------------------

def format_seconds(s: float) -> str:
    if s is None or math.isnan(s):
        return "-"
    if s < 1e-3:
        return "%.1f us" % (s * 1e6)
    if s < 1.0:
        return "%.2f ms" % (s * 1e3)
    return "%.2f s" % s


def ratio(peer: Timing, ours: Timing) -> Optional[float]:
    """peer time / our time: above 1 means we are faster."""
    if not (peer.ok and ours.ok) or ours.median_s <= 0:
        return None
    return peer.median_s / ours.median_s


def gbps(bytes_moved: Optional[int], t: Timing) -> Optional[float]:
    if not bytes_moved or not t.ok or t.median_s <= 0:
        return None
    return bytes_moved / t.median_s / 1e9


@dataclass
class Target:
    text: str
    met: Optional[bool]  # None: could not be judged (a timing failed)
    detail: str = ""


@dataclass
class Section:
    """One result table. `bandwidth_ref` names the peer (usually "copy") whose bandwidth is shown
    beside ours for memory-bound kernels; rows then need `bytes_moved`."""

    name: str
    title: str
    ours_label: str = "ours"
    bandwidth_ref: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    rows: List[Dict[str, Any]] = field(default_factory=list)
    targets: List[Target] = field(default_factory=list)

    def add_row(self, case: str, ours: Timing, peers: Optional[Dict[str, Timing]] = None,
                bytes_moved: Optional[int] = None, peer_bytes: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
        """`bytes_moved`: the bytes our op must move (the GB/s basis of every column unless `peer_bytes`
        gives a peer its own, e.g. a copy moves fewer bytes than a two-pass fake quant)."""
        peers = dict(peers or {})
        row = {"case": case, "ours": ours, "peers": peers, "bytes_moved": bytes_moved,
               "peer_bytes": dict(peer_bytes or {}),
               "ratios": {name: ratio(t, ours) for name, t in peers.items()}}
        self.rows.append(row)
        return row

    def add_target(self, text: str, met: Optional[bool], detail: str = "") -> None:
        self.targets.append(Target(text, met, detail))

    def peer_names(self) -> List[str]:
        names: List[str] = []
        for row in self.rows:
            names += [n for n in row["peers"] if n not in names]
        return names

    def to_dict(self) -> Dict[str, Any]:
        rows = []
        for row in self.rows:
            out = {"case": row["case"], "ours": asdict(row["ours"]),
                   "peers": {n: asdict(t) for n, t in row["peers"].items()},
                   "ratio_peer_over_ours": row["ratios"], "bytes_moved": row["bytes_moved"]}
            if row["bytes_moved"]:
                out["peer_bytes_moved"] = row.get("peer_bytes", {})
                out["gbps"] = {"ours": gbps(row["bytes_moved"], row["ours"])}
                out["gbps"].update({n: gbps(row.get("peer_bytes", {}).get(n, row["bytes_moved"]), t)
                                    for n, t in row["peers"].items()})
            rows.append(out)
        return {"name": self.name, "title": self.title, "ours_label": self.ours_label,
                "bandwidth_ref": self.bandwidth_ref, "notes": self.notes, "rows": rows,
                "targets": [asdict(t) for t in self.targets]}

    def to_markdown(self) -> str:
        return section_markdown(self.to_dict())


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_markdown(sec: Dict[str, Any], level: int = 2) -> str:
    """Markdown of a section dict (as written by Section.to_dict, so merged JSON renders the same)."""
    peers: List[str] = []
    for row in sec["rows"]:
        peers += [n for n in row["peers"] if n not in peers]
    ref = sec.get("bandwidth_ref")
    with_bw = any(row.get("bytes_moved") for row in sec["rows"])
    head = ["case", sec.get("ours_label") or "ours"] + list(peers)
    if with_bw:
        head += ["ours GB/s"] + (["%s GB/s" % ref, "ours %% of %s BW" % ref] if ref else [])
    lines = ["#" * level + " " + sec["title"], ""]
    lines += [n for n in sec.get("notes", [])]
    if sec.get("notes"):
        lines.append("")
    if peers:
        lines += ["Cells: median time per call (peer time / our time; above 1 means ours is faster).", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    failures: List[str] = []

    def timing_cell(t: Dict[str, Any], rat: Optional[float] = None) -> str:
        if t.get("error"):
            if t["error"] not in failures:
                failures.append(t["error"])
            kind = "skipped" if t["error"].startswith("skipped") else "failed"
            return "%s [%d]" % (kind, failures.index(t["error"]) + 1)
        text = format_seconds(t["median_s"])
        return text + (" (%.2fx)" % rat if rat is not None else "")

    for row in sec["rows"]:
        cells = [row["case"], timing_cell(row["ours"])]
        for p in peers:
            t = row["peers"].get(p)
            cells.append(timing_cell(t, row["ratio_peer_over_ours"].get(p)) if t else "")
        if with_bw:
            bw = row.get("gbps") or {}
            ours_bw, ref_bw = bw.get("ours"), bw.get(ref) if ref else None
            cells.append("%.1f" % ours_bw if ours_bw else "-")
            if ref:
                cells.append("%.1f" % ref_bw if ref_bw else "-")
                cells.append("%.0f%%" % (100 * ours_bw / ref_bw) if ours_bw and ref_bw else "-")
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    for i, text in enumerate(failures, 1):
        lines.append("%s[%d] %s" % ("\n" if i == 1 else "", i, _cell(text)))
    if sec.get("targets"):
        lines += ["", "Targets:"]
        for t in sec["targets"]:
            mark = {True: "MET", False: "MISSED", None: "NOT JUDGED"}[t["met"]]
            lines.append("- **%s** %s%s" % (mark, t["text"], (" - " + t["detail"]) if t.get("detail") else ""))
    return "\n".join(lines) + "\n"


# --- environment -----------------------------------------------------------------------------------

def _cpuinfo() -> Dict[str, str]:
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "flags") and key not in info:
                    info[key] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine() or "unknown cpu"


def cpu_isa() -> str:
    """The ISA qkernels' CPU loops dispatch to (same rule as csrc/cpu/simd.h), from /proc/cpuinfo."""
    flags = set(_cpuinfo().get("flags", "").split())
    if {"avx512f", "avx512bw", "avx512vl"} <= flags:
        return "avx512"
    if {"avx2", "fma", "f16c"} <= flags:
        return "avx2"
    return "base" if flags else "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device: torch.device) -> str:
    """File-name form of the device: e.g. cpu-intel-xeon-processor, cuda-nvidia-h100-80gb-hbm3."""
    name = re.sub(r"\((r|tm)\)", "", device_name(device).lower())
    name = re.sub(r"[^a-z0-9]+", "-", name).strip("-")
    return "%s-%s" % (device.type, name or "unknown")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# Environment variables that change CPU timings a lot: OpenMP waiting and torch's CPU allocator.
THREADING_ALLOC_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "THP_MEM_ALLOC_ENABLE")


def environment(device: torch.device) -> Dict[str, Any]:
    """What the numbers depend on. Load average matters: other jobs on a 2-core machine skew times."""
    env: Dict[str, Any] = {
        "timestamp_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "threading_alloc_env": " ".join("%s=%s" % (k, os.environ[k]) for k in THREADING_ALLOC_VARS
                                        if k in os.environ) or "none set",
        "cpu_isa_qkernels": cpu_isa(),
        "torch_cpu_capability": _safe(lambda: torch.backends.cpu.get_cpu_capability()),
        "git": _git_commit(),
        "loadavg_1_5_15": _safe(lambda: [round(v, 2) for v in os.getloadavg()]),
    }
    try:
        import qkernels

        env["qkernels"] = qkernels.__version__
        env["qkernels_has_cuda_kernels"] = qkernels.has_cuda_kernels()
    except Exception as exc:  # the benchmarks still record why the library is unusable
        env["qkernels"] = "import failed: " + error_text(exc)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
    return env


def _safe(fn):
    try:
        return fn()
    except Exception as exc:
        return "unavailable: " + error_text(exc)


ENV_KEYS = ["timestamp_utc", "device", "torch", "torch_cuda", "python", "cpu", "cpu_count", "torch_threads", "threading_alloc_env",
            "cpu_isa_qkernels", "torch_cpu_capability", "qkernels", "qkernels_has_cuda_kernels", "gpu_memory_gib",
            "gpu_sm_count", "git", "loadavg_1_5_15"]


def environment_markdown(env: Dict[str, Any]) -> str:
    keys = [k for k in ENV_KEYS if k in env] + [k for k in env if k not in ENV_KEYS]
    return "\n".join("- %s: %s" % (k, env[k]) for k in keys) + "\n"


# --- command line and result files -----------------------------------------------------------------

def arg_parser(description: Optional[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (what run_all uses)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is steadier on a loaded machine")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where result files go")
    parser.add_argument("--no-save", action="store_true", help="print the tables only")
    return parser


def setup(args: argparse.Namespace):
    """Common start of a benchmark script: (device, environment record taken before measuring)."""
    device = resolve_device(args.device)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return device, environment(device)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same folder and os.replace: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix="." + path.name + ".")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def script_markdown(doc: Dict[str, Any], level: int = 1) -> str:
    """One script's results: a heading, when and under what load it ran, then its tables."""
    env = doc.get("environment") or {}
    title = "Run summary (run_all)" if doc["script"] == "_run_all" else doc["script"]
    text = "%s %s\n\nMeasured %s UTC (torch threads %s, env: %s), load average %s before and %s after: `%s`\n\n" % (
        "#" * level, title, env.get("timestamp_utc"), env.get("torch_threads"), env.get("threading_alloc_env"),
        env.get("loadavg_1_5_15"), doc.get("loadavg_after"), doc.get("command", ""))
    if doc.get("error"):
        text += "Error: %s\n\n" % doc["error"]
    if doc.get("extra_markdown"):
        text += doc["extra_markdown"] + "\n"
    return text + "\n".join(section_markdown(s, level + 1) for s in doc.get("sections") or [])


def publish(script: str, sections: List[Section], args: argparse.Namespace, device: torch.device,
            env: Optional[Dict[str, Any]] = None) -> Optional[Path]:
    """Print the tables, write results/<device>/<script>.json|md and refresh results/<device>.json|md.

    Pass `env` as recorded when the script started (environment(device)) so its load average is the
    one before measuring; the load after the run is added here."""
    import sys

    doc = {"script": script, "command": " ".join(["python -m benchmarks." + script] + sys.argv[1:]),
           "environment": env or environment(device),
           "loadavg_after": _safe(lambda: [round(v, 2) for v in os.getloadavg()]),
           "sections": [s.to_dict() for s in sections]}
    print(script_markdown(doc), flush=True)
    if args.no_save:
        return None
    folder = Path(args.results_dir) / device_slug(device)
    write_atomic(folder / (script + ".json"), json.dumps(_nan_to_none(doc), indent=1) + "\n")
    write_atomic(folder / (script + ".md"), script_markdown(doc))
    return merge_results(Path(args.results_dir), device)


def _nan_to_none(obj):
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_nan_to_none(v) for v in obj]
    return obj


def merge_results(results_dir: Path, device: torch.device) -> Path:
    """Combine every results/<device>/*.json into results/<device>.json and .md (scripts sorted by name)."""
    slug = device_slug(device)
    folder = results_dir / slug
    docs = []
    for path in sorted(folder.glob("*.json")):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError) as exc:
            docs.append({"script": path.stem, "environment": {}, "sections": [],
                         "error": "unreadable result file: " + error_text(exc)})
    env = environment(device)
    merged = {"device": slug, "environment": env, "scripts": docs}
    md = ["# Benchmark results: %s\n" % env["device"], "Merged %s UTC.\n" % env["timestamp_utc"],
          "How to read these tables: benchmarks/README.md. Ratios are peer time / our time: "
          "above 1 means qkernels is faster.\n", "## Environment\n", environment_markdown(env)]
    for doc in docs:
        md.append(script_markdown(doc, level=2))
    write_atomic(results_dir / (slug + ".json"), json.dumps(_nan_to_none(merged), indent=1) + "\n")
    out = results_dir / (slug + ".md")
    write_atomic(out, "\n".join(md))
    return out
