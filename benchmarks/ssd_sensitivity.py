"""Sensitivity analysis on MobileNet-SSD: the mAP each group of layers costs when it alone is quantized.

From the float32 checkpoint and dataset of benchmarks/ssd_calibration.py (same flags), ``qkernels.
sensitivity`` quantizes one group at a time (the stem, the early and late body_19 blocks, body_10, the
extra layers, the box and the class heads), calibrates it post-training on the same batches and
measures mAP on the test split (fake-quantized model in eval mode); then the whole model, and the whole
model with the worst group kept float (``report.skip_pattern(1)``). Writes a markdown table and JSON.

    python -m benchmarks.ssd_sensitivity --init_model demo/models/fp32/best.pt --data_dir data/synthetic
"""
import os
import time
from pathlib import Path

from .ssd_calibration import _args, load_experiment, log, write_report

GROUPS = {  # prefix -> group; every quantized layer belongs to exactly one
    "stem (body_19.0)": ("body_19.0.",),
    "body_19 blocks 1-5": tuple("body_19.%d." % i for i in range(1, 6)),
    "body_19 blocks 6-11": tuple("body_19.%d." % i for i in range(6, 12)),
    "body_10": ("body_10.",),
    "extras": ("extras.",),
    "loc heads": ("loc_heads.",),
    "conf heads": ("conf_heads.",),
}


def layer_groups(layers):
    groups = {name: [n for n in layers if (n + ".").startswith(prefixes)] for name, prefixes in GROUPS.items()}
    missing = sorted(set(layers) - {n for g in groups.values() for n in g})
    if missing:
        raise RuntimeError("ssd_sensitivity: layers in no group: %s" % ", ".join(missing))
    return groups


def main(argv=None):
    args = _args(argv)
    import torch

    import qkernels
    from ssd import checkpoint as ck
    from ssd.engine import evaluate as evaluate_map

    dataset, labels, test_loader, calib, quant, float_model = load_experiment(args, log)
    device = torch.device("cpu")
    t = ck.make_transpiler(quant)
    probe = t.training_transpile(ck.model_from_checkpoint(ck.read_checkpoint(args.init_model)))
    groups = layer_groups([name for name, _old, _new in t.summary.swapped])
    del probe
    evaluations = []

    def evaluate(model):
        start = time.perf_counter()
        value = evaluate_map(model, test_loader, len(labels), device)["map"]
        evaluations.append(time.perf_counter() - start)
        log("  evaluation %d: mAP %.4f (%.0f s)" % (len(evaluations), value, evaluations[-1]))
        return value

    load = [os.getloadavg()]
    start = time.perf_counter()
    report = qkernels.sensitivity(float_model, ck.make_transpiler(quant), evaluate, calib, groups=groups,
                                  method="abs_max")
    seconds = time.perf_counter() - start
    load.append(os.getloadavg())
    lines = ["# MobileNet-SSD: sensitivity of each layer group to quantization", "",
             "Dataset: generated shapes (%s train / %s test images, seed %s); float32 checkpoint %s; activations "
             "%s, weights %s; each group alone quantized, calibrated (%s) on %d batches of %d training images; "
             "mAP@0.5, 11-point, on the test split, fake-quantized model in eval mode. %d evaluations in %.0f s; "
             "load average before %s, after %s. Command: `python -m benchmarks.ssd_sensitivity --init_model %s "
             "--data_dir %s`."
             % (dataset.get("train"), dataset.get("test"), dataset.get("seed"), args.init_model,
                args.act_quant_type, args.weight_quant_type, report.calibration, len(calib), args.batch_size,
                len(evaluations), seconds, "%.1f %.1f %.1f" % load[0], "%.1f %.1f %.1f" % load[1],
                args.init_model, args.data_dir), "",
             "| quantized | layers | mAP | drop vs float32 |", "|---|---:|---:|---:|",
             "| nothing (float32) | 0 | %.4f | +0.0000 |" % report.float_metric]
    for row in report.rows:
        lines.append("| %s alone | %d | %.4f | %+.4f |" % (row.group, len(row.layers), row.metric, -row.drop))
    total = sum(len(r.layers) for r in report.rows)
    lines.append("| everything | %d | %.4f | %+.4f |" % (total, report.quantized_metric,
                                                         report.quantized_metric - report.float_metric))
    if report.rows and report.worst_kept_float_metric is not None:
        lines.append("| everything but %s | %d | %.4f | %+.4f |" % (
            report.rows[0].group, total - len(report.rows[0].layers), report.worst_kept_float_metric,
            report.worst_kept_float_metric - report.float_metric))
    record = {"args": vars(args), "dataset": dataset, "load": load, "seconds": seconds,
              "float": report.float_metric, "quantized": report.quantized_metric,
              "worst_kept_float": report.worst_kept_float_metric,
              "rows": [{"group": r.group, "layers": r.layers, "map": r.metric, "drop": r.drop} for r in report.rows]}
    write_report(Path(str(args.out).replace("ssd_calibration", "ssd_sensitivity")), lines, record)


if __name__ == "__main__":
    main()
