"""Int8 inference of torchvision-style ResNet-18 and MobileNetV2 (benchmarks/torchvision_style.py), 160x160:
our graph-transpiled int8 model vs torch.ao's x86 FX int8 model vs float32, batch 1 and 8, same run.

Ours: QuantizeTranspiler(range_abs_max, fold_bn=True).training_transpile, calibration by running the QAT
model in train() mode on the calibration batches with the batch norms in eval() (scales only), then
convert_to_int8. torch.ao: prepare_fx with get_default_qconfig_mapping("x86") (per-channel weights,
histogram activation observers), the same calibration batches, convert_fx. float32: the eager model
(NCHW, and channels_last). Samples of all models are interleaved (common.measure_group). Freed memory is
kept in the heap for every model alike (glibc mallopt, recorded in the notes): otherwise page faults of
fresh activations dominate on these VMs.

Targets (issue 16): every batch norm after a conv folded and every ReLU directly after one fused in our
int8 models; ours at least as fast as torch.ao at batch 1 and 8.
"""
import copy
import ctypes
import json
import warnings
from pathlib import Path

import torch

from qkernels import QuantizeTranspiler

from . import common
from .torchvision_style import mobilenet_v2, resnet18

SCRIPT = "bench_torchvision_int8"
MODELS = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}
SIZE = 160
CALIBRATION_BATCHES = 4

# glibc mallopt parameters (malloc.h): keep freed blocks for reuse instead of unmapping them.
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> str:
    """Serve allocations up to 32 MiB from the heap and never trim it; returns the setting as text."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as exc:
        return "unchanged (no glibc: %s)" % exc
    settings = ((M_MMAP_THRESHOLD, 32 << 20), (M_TRIM_THRESHOLD, 1 << 30), (M_TOP_PAD, 64 << 20))
    ok = all(libc.mallopt(param, value) == 1 for param, value in settings)
    return ("glibc mallopt M_MMAP_THRESHOLD=32MiB M_TRIM_THRESHOLD=1GiB M_TOP_PAD=64MiB" if ok
            else "glibc mallopt refused (defaults in use)")


def calibration_batches(batch: int):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(batch, 3, SIZE, SIZE, generator=gen) for _ in range(CALIBRATION_BATCHES)]


def ours_int8(float_model, calibration):
    t = QuantizeTranspiler(activation_quantize_type="range_abs_max", weight_quantize_type="channel_wise_abs_max",
                           fold_bn=True)
    qat = t.training_transpile(copy.deepcopy(float_model))
    qat.train()
    for m in qat.modules():  # calibrate the activation scales only: batch-norm statistics stay as they are
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        for x in calibration:
            qat(x)
    qat.eval()
    int8 = t.convert_to_int8(qat)
    return int8, t.summary


def torch_ao_int8(float_model, calibration):
    with warnings.catch_warnings():  # torch.ao.quantization announces its deprecation on every call
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        prepared = prepare_fx(copy.deepcopy(float_model).eval(), get_default_qconfig_mapping("x86"),
                              (calibration[0],))
        with torch.no_grad():
            for x in calibration:
                prepared(x)
        return convert_fx(prepared)


def counts_note(name, summary, float_model) -> str:
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in float_model.modules())
    c = summary.counts
    return ("%s: %d of %d batch norms folded, %d activations fused, %d of %d layers chained in int8; still in "
            "float: %s; returned %s." % (name, c["folded"], n_bn, c["fused"], c["chained"], c["swapped"],
                                        ", ".join("%d %s" % (v, k) for k, v in sorted(summary.float_ops.items())),
                                        "a GraphModule" if "GraphModule" in summary.returned else "in place"))


def bench_model(name, args, device, batches, malloc_setting):
    torch.manual_seed(0)
    float_model = MODELS[name](num_classes=1000).eval()
    calibration = calibration_batches(8)
    ours, summary = ours_int8(float_model, calibration)
    models = {"ours": ours, "float32": float_model,
              "float32 channels_last": copy.deepcopy(float_model).to(memory_format=torch.channels_last)}
    try:
        models["torch.ao x86 int8"] = torch_ao_int8(float_model, calibration)
    except Exception as exc:  # recorded in the table, the run goes on
        models["torch.ao x86 int8"] = common.Timing(error=common.error_text(exc))

    def infer(model, channels_last=False):
        def run(x):
            with torch.inference_mode():
                model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        return run

    section = common.Section(name, "%s int8 inference, %dx%d (ours: graph transpiler, range_abs_max, BN folded)"
                             % (name, SIZE, SIZE), ours_label="ours (int8)")
    section.notes.append(counts_note(name, summary, float_model))
    section.notes.append("Memory: %s. torch.ao: prepare_fx/convert_fx, x86 default qconfig mapping, calibrated on "
                         "the same %d batches." % (malloc_setting, CALIBRATION_BATCHES))
    fold_target = summary.counts["folded"] == sum(isinstance(m, torch.nn.BatchNorm2d) for m in float_model.modules())
    section.add_target("every batch norm after a conv folded", fold_target,
                       "%d still in float" % summary.float_ops.get("batch norms", -1))
    after_layer = [n for n, why in summary.not_fused if "Conv2d" in why or "Linear" in why]
    section.add_target("every ReLU directly after a conv fused", not after_layer,
                       "%d fused; not fused after a conv: %s" % (summary.counts["fused"], after_layer or "none"))
    ratios = {}
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        inputs = [torch.randn(batch, 3, SIZE, SIZE, generator=gen) for _ in range(2)]
        fns = {k: (m if isinstance(m, common.Timing) else infer(m, k.endswith("channels_last")))
               for k, m in models.items()}
        timings = common.measure_group(fns, inputs, device, quick=args.quick, warmup=3,
                                       repeats=7 if args.quick else 15, max_total_s=4.0 if args.quick else 10.0)
        ours_t = timings.pop("ours")
        section.add_row("batch %d" % batch, ours_t, timings)
        r = common.ratio(timings["torch.ao x86 int8"], ours_t)
        ratios["batch %d" % batch] = r
        section.add_target("batch %d: at least as fast as torch.ao x86 int8" % batch,
                           None if r is None else r >= 1.0, "" if r is None else "%.2fx" % r)
    return section, {"ratios_vs_torch_ao": ratios, "summary": summary.to_dict()}


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--json", type=Path, default=None, help="also write the sections and summaries here")
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()
    malloc_setting = keep_freed_memory()
    device, env = common.setup(args)
    if device.type != "cpu":
        raise SystemExit("bench_torchvision_int8: CPU only (torch.ao's x86 int8 peer runs on the CPU)")
    env["malloc"] = malloc_setting
    sections, results = [], {}
    for name in args.models:
        section, results[name] = bench_model(name, args, device, (1, 8), malloc_setting)
        sections.append(section)
    common.publish(SCRIPT, sections, args, device, env)
    if args.json is not None:
        doc = {"script": SCRIPT, "environment": env, "results": results, "sections": [s.to_dict() for s in sections]}
        common.write_atomic(args.json, json.dumps(common._nan_to_none(doc), indent=1) + "\n")


if __name__ == "__main__":
    main()
