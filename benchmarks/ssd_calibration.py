"""Post-training calibration against QAT on MobileNet-SSD: what each calibrator costs in mAP.

From one float32 checkpoint (``--init_model``, e.g. the one ``make demo`` trains), on the generated
shapes dataset (``ssd/data/synthetic.py``, written to ``--data_dir`` when missing):

- float32, evaluated as is;
- calibrated, no training: ``QuantizeTranspiler.calibrate`` over ``--calib_batches`` batches of training
  images (evaluation transform) with ``abs_max`` (the reference's statistic), ``percentile`` and ``mse``;
- QAT: ``ssd.main_quant`` fine-tuning of the same checkpoint for ``--qat_epochs`` epochs (demo recipe);

each then frozen (``freeze_program``) and converted to int8 (``convert_to_int8``) and evaluated on the
test split (mAP at IoU 0.5, 11-point). Activations are ``--act_quant_type`` (static), weights
``--weight_quant_type``. Writes a markdown table and a JSON record to ``--out`` (.md / .json).

    python -m benchmarks.ssd_calibration --init_model demo/models/fp32/best.pt --data_dir data/synthetic
"""
import argparse
import copy
import json
import os
import time
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init_model", required=True, help="float32 MobileNet-SSD checkpoint")
    p.add_argument("--data_dir", default="data/synthetic")
    p.add_argument("--train", type=int, default=320, help="trainval images when the dataset is generated")
    p.add_argument("--test", type=int, default=80, help="test images when the dataset is generated")
    p.add_argument("--act_quant_type", default="range_abs_max", choices=("range_abs_max", "moving_average_abs_max"))
    p.add_argument("--weight_quant_type", default="abs_max", choices=("abs_max", "channel_wise_abs_max"))
    p.add_argument("--calib_batches", type=int, default=8)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--qat_epochs", type=int, default=2, help="0 skips QAT")
    p.add_argument("--work_dir", default="/tmp/qkernels_ssd_calibration", help="QAT checkpoints")
    p.add_argument("--out", default="benchmarks/results/ssd_calibration")
    return p.parse_args(argv)


def _ensure_dataset(args, log):
    from ssd.data import synthetic

    stamp = Path(args.data_dir) / "dataset.json"
    if stamp.is_file():
        log("dataset: %s (%s)" % (args.data_dir, stamp.read_text().strip()))
        return json.loads(stamp.read_text())
    synthetic.generate(args.data_dir, seed=0, train=args.train, test=args.test)
    info = {"seed": 0, "train": args.train, "test": args.test, "size": synthetic.IMAGE_SIZE,
            "classes": list(synthetic.CLASSES)}
    stamp.write_text(json.dumps(info))
    log("dataset: generated %d + %d images in %s" % (args.train, args.test, args.data_dir))
    return info


def load_experiment(args, log):
    """(dataset record, labels, test loader, calibration batches, quantization settings, float model) of
    ``args`` (this script's flags; benchmarks/ssd_sensitivity.py uses the same)."""
    import torch

    from ssd import checkpoint as ck
    from ssd.data import IMAGE_SIZE, EvalTransform, VOCDataset, build_datasets, default_image_sets, eval_loader

    torch.manual_seed(0)
    dataset = _ensure_dataset(args, log)
    labels, _, test_ds = build_datasets(args.data_dir, None, None, need_train=False)
    train_set, _test_set = default_image_sets(args.data_dir)
    calib_ds = VOCDataset(args.data_dir, train_set, labels, EvalTransform(IMAGE_SIZE), seed=0)
    test_loader = eval_loader(test_ds, args.batch_size)
    calib = []
    for batch in eval_loader(calib_ds, args.batch_size):  # the first training images (the set is random)
        calib.append(batch.images)
        if len(calib) == args.calib_batches:
            break
    quant = {"act_quant_type": args.act_quant_type, "weight_quant_type": args.weight_quant_type, "fold_bn": False}
    float_model = ck.model_from_checkpoint(ck.read_checkpoint(args.init_model)).eval()
    return dataset, labels, test_loader, calib, quant, float_model


def log(msg):
    print(msg, flush=True)


def write_report(out: Path, lines, record) -> None:
    """``out``.md (the table lines) and ``out``.json (the record), each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".md", "\n".join(lines) + "\n"), (".json", json.dumps(record, indent=1))):
        tmp = out.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    print("\n".join(lines))


def main(argv=None):
    args = _args(argv)
    import torch

    from ssd import checkpoint as ck
    from ssd import main_quant
    from ssd.engine import evaluate as evaluate_map

    dataset, labels, test_loader, calib, quant, float_model = load_experiment(args, log)
    device = torch.device("cpu")
    rows, load = [], [os.getloadavg()]

    def evaluate(name, model, seconds=None):
        r = evaluate_map(model, test_loader, len(labels), device)
        rows.append({"variant": name, "map": r["map"], "ms_per_image": r["ms_per_image"], "prep_s": seconds})
        log("%-28s mAP %.4f  %.1f ms/image" % (name, r["map"], r["ms_per_image"]))

    def deployed(name, qat_model, seconds):
        t = ck.make_transpiler(quant)
        frozen = t.freeze_program(copy.deepcopy(qat_model).eval())
        evaluate(name + ", frozen", frozen, seconds)
        evaluate(name + ", int8", t.convert_to_int8(copy.deepcopy(frozen), example_inputs=(calib[0][:1],)), seconds)

    evaluate("float32", float_model)
    for method in ("abs_max", "percentile", "mse"):
        start = time.perf_counter()
        t = ck.make_transpiler(quant)
        model = t.training_transpile(copy.deepcopy(float_model))
        t.calibrate(model, calib, method=method, percentile=args.percentile)
        label = "calibrated %s" % (method if method != "percentile" else "percentile %g" % args.percentile)
        deployed(label, model, time.perf_counter() - start)
    if args.qat_epochs > 0:
        start = time.perf_counter()
        save = Path(args.work_dir) / ("qat_%s" % args.act_quant_type)
        main_quant.run(["--mode", "train", "--data_dir", args.data_dir, "--init_model", args.init_model,
                "--act_quant_type", args.act_quant_type, "--weight_quant_type", args.weight_quant_type,
                "--epoc_num", str(args.qat_epochs), "--learning_rate", "0.0001", "--lr_epochs", "30,60",
                "--lr_decay_rates", "1,0.1,0.01", "--batch_size", str(args.batch_size), "--num_workers", "1",
                "--augment", "light", "--seed", "0", "--use_gpu", "false", "--model_save_dir", str(save),
                "--quiet"])
        qat = ck.model_from_checkpoint(ck.read_checkpoint(save / "last.pt")).eval()
        deployed("QAT %d epochs" % args.qat_epochs, qat, time.perf_counter() - start)
    load.append(os.getloadavg())

    float_map = rows[0]["map"]
    lines = ["# MobileNet-SSD: post-training calibration vs QAT", "",
             "Dataset: generated shapes (%s train / %s test images, %s px, seed %s); float32 checkpoint %s; "
             "activations %s, weights %s; calibration on %d batches of %d training images (no augmentation); "
             "mAP@0.5, 11-point, on the test split. Load average before %s, after %s."
             % (dataset.get("train"), dataset.get("test"), dataset.get("size"), dataset.get("seed"),
                args.init_model, args.act_quant_type, args.weight_quant_type, len(calib), args.batch_size,
                "%.1f %.1f %.1f" % load[0], "%.1f %.1f %.1f" % load[1]), "",
             "| variant | mAP | vs float32 | preparation (s) |", "|---|---:|---:|---:|"]
    for r in rows:
        lines.append("| %s | %.4f | %+.4f | %s |" % (r["variant"], r["map"], r["map"] - float_map,
                                                   "" if r["prep_s"] is None else "%.0f" % r["prep_s"]))
    write_report(Path(args.out), lines, {"args": vars(args), "dataset": dataset, "load": load, "rows": rows})


if __name__ == "__main__":
    main()
