"""Quantization-aware training and int8 inference of MobileNet-v1-SSD 300x300, end to end.

Training step (batch 8 by default): forward + ssd.loss.MultiBoxLoss + backward + SGD step, for
- float32 (the model as it is),
- our QAT (QuantizeTranspiler.training_transpile) with each activation type, and range_abs_max with
  fold_bn=True (batch norm folded into the quantized weight),
- PyTorch's eager-mode QAT (torch.ao.quantization.prepare_qat with get_default_qat_qconfig("x86")) on the
  same model, unfused, and with conv-bn-relu fused first (fuse_modules_qat: the counterpart of fold_bn).
Inference (batch 1 and 8, torch.inference_mode): float32 vs our frozen model (freeze_program) vs our int8
model (convert_to_int8), static (range_abs_max, layers chained in int8) and dynamic (abs_max).

The tables show times; in brackets peer time / our time (above 1: ours is faster). Targets: a QAT step
at most 1.3x the float32 step (torch.ao measured about 2.2x on this CPU); int8 inference at least 2x
faster than float32. Input images are random; the loss targets are two random boxes per image.
"""
import copy
import json
import warnings
from pathlib import Path

import torch
from torch import nn

from qkernels import QuantizeTranspiler
from ssd.model import MobileNetSSD

from . import common

SCRIPT = "bench_qat"
QAT_LIMIT = 1.3
INT8_SPEEDUP = 2.0


def make_batch(batch: int, size: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, size, size, generator=gen)
    boxes, labels = [], []
    for _ in range(batch):
        corner = torch.rand(2, 2, generator=gen) * 0.5
        extent = 0.2 + torch.rand(2, 2, generator=gen) * 0.3
        boxes.append(torch.cat([corner, corner + extent], dim=1))
        labels.append(torch.randint(1, 21, (2,), generator=gen))
    return images, boxes, labels


def training_step(model: nn.Module, loss_fn: nn.Module):
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    model.train()

    def step(images, boxes, labels):
        locs, confs = model(images)
        loss = loss_fn(locs, confs, boxes, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def conv_bn_relu_names(model: nn.Module):
    """[[conv, bn, relu], ...] module names of every Conv2d-BatchNorm2d-ReLU run in an nn.Sequential."""
    groups = []
    for name, m in model.named_modules():
        if type(m) is nn.Sequential:
            kids = list(m.named_children())
            for i in range(len(kids) - 2):
                kinds = [type(k) for _, k in kids[i:i + 3]]
                if kinds == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]:
                    groups.append(["%s.%s" % (name, n) if name else n for n, _ in kids[i:i + 3]])
    return groups


def torch_ao_qat(model: nn.Module, fuse: bool) -> nn.Module:
    with warnings.catch_warnings():  # torch.ao.quantization announces its deprecation on every call
        warnings.simplefilter("ignore")
        import torch.ao.quantization as tq

        model = copy.deepcopy(model).train()
        if fuse:
            model = tq.fuse_modules_qat(model, conv_bn_relu_names(model))
        model.qconfig = tq.get_default_qat_qconfig("x86")
        return tq.prepare_qat(model)


def build_training(seed_model: nn.Module, include_ao: bool):
    """name -> our QAT model; name -> peer model."""
    ours = {}
    for kind in ("abs_max", "range_abs_max", "moving_average_abs_max"):
        ours[kind] = QuantizeTranspiler(activation_quantize_type=kind).training_transpile(copy.deepcopy(seed_model))
    ours["range_abs_max+fold_bn"] = QuantizeTranspiler(activation_quantize_type="range_abs_max", fold_bn=True) \
        .training_transpile(copy.deepcopy(seed_model))
    peers = {"float32": copy.deepcopy(seed_model)}
    if include_ao:
        for name, fuse in (("torch.ao QAT", False), ("torch.ao QAT fused", True)):
            try:
                peers[name] = torch_ao_qat(seed_model, fuse)
            except Exception as exc:  # recorded in the table, the run goes on
                peers[name] = common.Timing(error=common.error_text(exc))
    return ours, peers


def bench_training(args, device, seed_model, batch, size):
    from ssd.loss import MultiBoxLoss

    loss_fn = MultiBoxLoss(num_classes=21).to(device)
    ours, peers = build_training(seed_model, include_ao=not args.no_ao)
    inputs = [make_batch(batch, size, seed) for seed in range(2)]
    fns = {}
    for name, model in {**peers, **ours}.items():
        fns[name] = model if isinstance(model, common.Timing) else training_step(model.to(device), loss_fn)
    timings = common.measure_group(fns, inputs, device, quick=args.quick, warmup=2, repeats=3 if args.quick else 5,
                                   min_sample_s=0.0, max_total_s=1e9)
    section = common.Section("qat_step", "MobileNet-SSD training step, batch %d, %dx%d (forward + MultiBoxLoss + "
                             "backward + SGD)" % (batch, size, size), ours_label="ours (QAT)")
    section.notes.append("Peers: the float32 model, and torch.ao eager QAT (x86 default qconfig) unfused / with "
                         "conv-bn-relu fused. Ratios above 1 mean our step is faster than the peer's.")
    peer_names = [n for n in peers]
    for name in ours:
        section.add_row(name, timings[name], {p: timings[p] for p in peer_names})
    float_t = timings["float32"]
    overheads = {}
    for name in ours:
        r = common.ratio(timings[name], float_t)  # our time / float time
        overheads[name] = r
        section.add_target("QAT step (%s) <= %.1fx the float32 step" % (name, QAT_LIMIT),
                           None if r is None else r <= QAT_LIMIT, "" if r is None else "%.2fx" % r)
    for p in peer_names[1:]:
        r = common.ratio(timings[p], float_t)
        if r is not None:
            section.notes.append("%s: %.2fx the float32 step." % (p, r))
    return section, overheads


def build_inference(seed_model, device, size):
    """float32, frozen and int8 models (scales from one training step on random data)."""
    models = {"float32": copy.deepcopy(seed_model).eval()}
    images, _, _ = make_batch(4, size, seed=5)
    for kind in ("range_abs_max", "abs_max"):
        t = QuantizeTranspiler(activation_quantize_type=kind)
        qat = t.training_transpile(copy.deepcopy(seed_model)).train()
        with torch.no_grad():
            qat(images)
        qat.eval()
        if kind == "range_abs_max":
            models["frozen"] = t.freeze_program(copy.deepcopy(qat))
            models["int8 static"] = t.convert_to_int8(copy.deepcopy(qat))
        else:
            models["int8 dynamic"] = t.convert_to_int8(copy.deepcopy(qat))
    return {k: m.to(device) for k, m in models.items()}


def bench_inference(args, device, seed_model, size, batches):
    models = build_inference(seed_model, device, size)

    def infer(model):
        def run(images):
            with torch.inference_mode():
                model(images)
        return run

    section = common.Section("int8_inference", "MobileNet-SSD inference, %dx%d: int8 vs float32 and frozen"
                             % (size, size), ours_label="ours (int8 static)")
    section.notes.append("int8 static: range_abs_max scales, BN folded, ReLU fused, consecutive convs chained in "
                         "int8; int8 dynamic: abs_max per batch (float between layers); frozen: "
                         "freeze_program (float conv on integer codes).")
    speedups = {}
    for batch in batches:
        inputs = [make_batch(batch, size, seed)[0] for seed in range(2)]
        fns = {name: infer(m) for name, m in models.items()}
        timings = common.measure_group(fns, inputs, device, quick=args.quick, warmup=2,
                                       repeats=5 if args.quick else 9, max_total_s=3.0 if args.quick else 8.0)
        section.add_row("batch %d" % batch, timings["int8 static"],
                        {n: timings[n] for n in ("float32", "frozen", "int8 dynamic")})
        for name in ("int8 static", "int8 dynamic"):
            s = common.ratio(timings["float32"], timings[name])
            speedups["%s batch %d" % (name, batch)] = s
            section.add_target("%s, batch %d: >= %.0fx faster than float32" % (name, batch, INT8_SPEEDUP),
                               None if s is None else s >= INT8_SPEEDUP, "" if s is None else "%.2fx" % s)
    return section, speedups


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--json", type=Path, default=None, help="also write the sections and ratios here")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8)")
    parser.add_argument("--size", type=int, default=300, help="image size (default 300)")
    parser.add_argument("--no-ao", action="store_true", help="skip the torch.ao QAT peers")
    parser.add_argument("--skip-training", action="store_true", help="inference tables only")
    args = parser.parse_args()
    device, env = common.setup(args)
    seed_model = MobileNetSSD(num_classes=21)
    sections, summary = [], {}
    if not args.skip_training:
        section, summary["qat_step_over_float32"] = bench_training(args, device, seed_model, args.batch, args.size)
        sections.append(section)
    section, summary["int8_speedup_over_float32"] = bench_inference(args, device, seed_model, args.size, (1, 8))
    sections.append(section)
    common.publish(SCRIPT, sections, args, device, env)
    if args.json is not None:
        doc = {"script": SCRIPT, "environment": env, "summary": summary, "sections": [s.to_dict() for s in sections]}
        common.write_atomic(args.json, json.dumps(common._nan_to_none(doc), indent=1) + "\n")


if __name__ == "__main__":
    main()
