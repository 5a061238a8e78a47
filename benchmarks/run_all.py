"""Run every benchmarks/bench_*.py (each in its own process, --quick unless --full) within a total time
budget, then write results/<device>.md and .json with all sections and the environment header.

A script that fails or runs out of time is recorded with its exit status and the end of its output;
the others still run. This is what `make bench` calls.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from . import common

HERE = Path(__file__).resolve().parent
SUMMARY = "_run_all"  # sorts before bench_* in the merged file
MIN_SCRIPT_S = 30.0


def discover():
    return sorted(p.stem for p in HERE.glob("bench_*.py"))


def clear_previous(folder: Path, scripts) -> None:
    """Drop earlier results of the scripts about to run, so a script failing now leaves no stale table."""
    for name in list(scripts) + [SUMMARY]:
        for suffix in (".json", ".md"):
            (folder / (name + suffix)).unlink(missing_ok=True)


def child_environment(policy: str):
    """OMP_WAIT_POLICY for the scripts. On a CPU shared with other jobs, OpenMP threads that spin while
    waiting compete with those jobs, and one descheduled thread stalls a whole parallel region: 2-thread
    ops then take 10-50x longer, ours and PyTorch's alike (same libgomp). PASSIVE waiting keeps the
    timings about the kernels. An OMP_WAIT_POLICY already set by the caller wins."""
    env = dict(os.environ)
    if policy != "default" and "OMP_WAIT_POLICY" not in env:
        env["OMP_WAIT_POLICY"] = policy.upper()
    return env


def run_script(name, extra_args, timeout_s, env):
    cmd = [sys.executable, "-m", "benchmarks." + name] + extra_args
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=str(HERE.parent), capture_output=True, text=True, timeout=timeout_s, env=env)
        rc, out, err, timed_out = proc.returncode, proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        rc, timed_out = None, True
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    seconds = time.perf_counter() - start
    sys.stdout.write(out)
    sys.stderr.write(err)
    tail = " ".join(err.strip().splitlines()[-3:]) if err.strip() else ""
    return {"script": name, "command": " ".join(cmd[1:]), "returncode": rc, "timed_out": timed_out,
            "timeout_s": round(timeout_s, 1), "seconds": round(seconds, 1),
            "error_tail": tail[-400:] if (rc != 0 or timed_out) else ""}


def summary_markdown(runs, budget_s, total_s, omp) -> str:
    lines = ["Budget %.0f s, used %.0f s. Each script ran in its own process, OMP_WAIT_POLICY=%s."
             % (budget_s, total_s, omp), "",
             "| script | status | seconds | note |", "|---|---|---|---|"]
    for r in runs:
        if r.get("skipped"):
            status = "skipped"
        elif r["timed_out"]:
            status = "TIMED OUT after %.0f s" % r["timeout_s"]
        else:
            status = "ok" if r["returncode"] == 0 else "FAILED (exit %s)" % r["returncode"]
        note = (r.get("skipped") or r.get("error_tail") or "").replace("|", "\\|")
        lines.append("| %s | %s | %s | %s |" % (r["script"], status, r.get("seconds", "-"), note))
    return "\n".join(lines) + "\n"


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--full", action="store_true", help="run the scripts without --quick (slow)")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for all scripts together (default 540)")
    parser.add_argument("--only", nargs="*", default=None, help="script names to run (default: every bench_*.py)")
    parser.add_argument("--omp-wait-policy", choices=("passive", "active", "default"), default="passive",
                        help="OMP_WAIT_POLICY for the scripts (default passive: steadier on a shared CPU; "
                             "'default' leaves it unset)")
    parser.add_argument("--script-args", default="",
                        help="extra arguments for every script, written with =, e.g. --script-args='--threads 1'")
    args = parser.parse_args()
    device, env = common.setup(args)
    scripts = [s for s in discover() if args.only is None or s in args.only]
    slug = common.device_slug(device)
    folder = Path(args.results_dir) / slug
    if not args.no_save:
        clear_previous(folder, scripts)

    passed = ["--device", args.device, "--results-dir", str(args.results_dir)]
    passed += [] if args.full else ["--quick"]
    passed += ["--no-save"] if args.no_save else []
    passed += ["--threads", str(args.threads)] if args.threads else []
    passed += args.script_args.split()

    child_env = child_environment(args.omp_wait_policy)
    start, runs = time.perf_counter(), []
    for i, name in enumerate(scripts):
        left = args.budget - (time.perf_counter() - start)
        if left < MIN_SCRIPT_S:
            runs.append({"script": name, "skipped": "total budget spent (%.0f s left)" % max(left, 0)})
            continue
        # Up to twice a fair share of what is left, so one slow script cannot starve the rest.
        fair = left / (len(scripts) - i)
        timeout = min(left, max(2 * fair, MIN_SCRIPT_S))
        print("== %s (timeout %.0f s)" % (name, timeout), flush=True)
        runs.append(run_script(name, passed, timeout, child_env))
    total = time.perf_counter() - start

    doc = {"script": SUMMARY, "command": "python -m benchmarks.run_all " + " ".join(sys.argv[1:]),
           "environment": env, "loadavg_after": common.environment(device).get("loadavg_1_5_15"),
           "runs": runs, "sections": [],
           "extra_markdown": summary_markdown(runs, args.budget, total, child_env.get("OMP_WAIT_POLICY", "unset"))}
    print(doc["extra_markdown"])
    if not args.no_save:
        common.write_atomic(folder / (SUMMARY + ".json"), json.dumps(doc, indent=1) + "\n")
        out = common.merge_results(Path(args.results_dir), device)
        print("results: %s and %s" % (out, out.with_suffix(".json")))
    failed = [r["script"] for r in runs if r.get("skipped") or r.get("timed_out") or r.get("returncode")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
