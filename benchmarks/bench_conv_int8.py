"""int8 convolutions of qkernels on every distinct conv shape of MobileNet-v1-SSD 300x300.

Ours: qkernels.conv2d_int8_packed (weights packed once by pack_conv2d_int8_weight, as an int8 layer does
and as the torch.ao peer's are prepacked) on channels-last int8 input, the epilogue a model uses:
per-channel scale, bias and ReLU with int8 output for the body and extra layers (the next layer reads it
directly), bias with float32 output for the heads.
Peers, measured in the same run:
- "fp32": F.conv2d in float32 with bias on channels-last input (oneDNN on CPU, cuDNN on GPU);
- "fp16" (GPU only): the same in float16;
- "torch.ao" (CPU only): torch.ops.quantized.conv2d(_relu) with prepacked weights on quint8
  channels-last input, x86 engine (fbgemm), per-tensor scales, quint8 output.
Ratios are peer time / our time (above 1: ours is faster); geometric means per layer kind and batch.
Targets (CPU, batch 8): pointwise >= 2x faster than fp32, depthwise at least as fast as fp32.

Options beyond the common ones: --json PATH also writes the results (tables and geometric means) there.
"""
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import qkernels

from . import common

SCRIPT = "bench_conv_int8"
KINDS = ("stem", "depthwise", "pointwise", "extra", "head")


def mobilenet_ssd_convs():
    """(kind, name, C, O, map size, kernel, stride, groups, bias): every distinct conv of MobileNet-SSD."""
    layers = [("stem", "stem 3->32 s2 @300", 3, 32, 300, 3, 2, 1, False)]
    blocks = [(32, 64, 1, 150), (64, 128, 2, 150), (128, 128, 1, 75), (128, 256, 2, 75), (256, 256, 1, 38),
              (256, 512, 2, 38), (512, 512, 1, 19), (512, 1024, 2, 19), (1024, 1024, 1, 10)]
    for c, o, s, size in blocks:
        layers.append(("depthwise", "dw %d s%d @%d" % (c, s, size), c, c, size, 3, s, c, False))
        out = (size + 2 - 3) // s + 1
        layers.append(("pointwise", "pw %d->%d @%d" % (c, o, out), c, o, out, 1, 1, 1, False))
    for c, mid, o, size in [(1024, 256, 512, 10), (512, 128, 256, 5), (256, 128, 256, 3), (256, 64, 128, 2)]:
        layers.append(("extra", "1x1 %d->%d @%d" % (c, mid, size), c, mid, size, 1, 1, 1, False))
        layers.append(("extra", "3x3 s2 %d->%d @%d" % (mid, o, size), mid, o, size, 3, 2, 1, False))
    for c, size, priors in [(512, 19, 3), (1024, 10, 6), (512, 5, 6), (256, 3, 6), (256, 2, 6), (128, 1, 6)]:
        for what, per in (("box", 4), ("cls", 21)):
            o = priors * per
            layers.append(("head", "%s %d->%d @%d" % (what, c, o, size), c, o, size, 1, 1, 1, True))
    return layers


QUICK_NAMES = {"stem 3->32 s2 @300", "dw 128 s1 @75", "dw 512 s2 @19", "pw 128->128 @75", "pw 1024->1024 @10",
               "3x3 s2 256->512 @10", "cls 1024->126 @10"}


def make_layer(layer, batch, device):
    kind, name, c, o, size, k, s, g, has_bias = layer
    gen = torch.Generator().manual_seed(0)
    pad = k // 2
    w8 = torch.randint(-127, 128, (o, c // g, k, k), dtype=torch.int8, generator=gen)
    bias = torch.randn(o, generator=gen)
    scale = torch.rand(o, generator=gen) * 1e-3
    nbytes = batch * c * size * size
    make_x = lambda: torch.randint(-128, 128, (batch, c, size, size), dtype=torch.int8).to(device).contiguous(
        memory_format=torch.channels_last)
    xs = common.rotating(make_x, common.buffer_count(4 * nbytes))
    w8d, biasd, scaled = w8.to(device), bias.to(device), scale.to(device)
    body = kind != "head"
    out_dtype, act = (torch.int8, "relu") if body else (torch.float32, None)

    packed = qkernels.pack_conv2d_int8_weight(w8d, g)

    def ours(x):
        return qkernels.conv2d_int8_packed(x, w8d, packed, biasd, stride=s, padding=pad, groups=g, scale=scaled,
                                           out_dtype=out_dtype, activation=act)

    wf = w8.float().to(device)
    xf_list = [x.float() for x in xs]

    def fp32(x):
        return F.conv2d(x, wf, biasd, s, pad, 1, g)

    peers = {"fp32": (fp32, xf_list)}
    if device.type == "cuda":
        wh, bh = wf.half(), biasd.half()
        peers["fp16"] = (lambda x: F.conv2d(x, wh, bh, s, pad, 1, g), [x.half() for x in xf_list])
    else:
        peers["torch.ao"] = torch_ao_peer(w8, bias, s, pad, g, body, xs)
    return ours, xs, peers


def torch_ao_peer(w8, bias, stride, pad, groups, relu, xs):
    engine = next((e for e in ("x86", "fbgemm") if e in torch.backends.quantized.supported_engines), None)
    if engine is None:
        return None
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wq = torch._make_per_tensor_quantized_tensor(w8, 0.01, 0)
        packed = torch.ops.quantized.conv2d_prepack(wq, bias, [stride, stride], [pad, pad], [1, 1], groups)
        xq = [torch._make_per_tensor_quantized_tensor((x.int() + 128).to(torch.uint8), 0.05, 128)
              .contiguous(memory_format=torch.channels_last) for x in xs]
    op = torch.ops.quantized.conv2d_relu if relu else torch.ops.quantized.conv2d
    return (lambda x: op(x, packed, 0.1, 0), xq)


def geomean(values):
    values = [v for v in values if v is not None and v > 0 and not math.isnan(v)]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


def run(device, quick, batches):
    layers = [l for l in mobilenet_ssd_convs() if not quick or l[1] in QUICK_NAMES]
    sections, summary = [], {}
    for batch in batches:
        sec = common.Section("conv_int8_b%d" % batch, "MobileNet-SSD convs, batch %d: conv2d_int8_packed vs peers" % batch)
        sec.notes.append("ours: conv2d_int8_packed (weights packed once), int8 in, per-channel scale + bias + relu "
                         "-> int8 out (heads: bias -> float32); fp32/fp16: F.conv2d with bias, channels-last; "
                         "torch.ao: quantized.conv2d(_relu) (prepacked weights), x86 engine, quint8 in/out. "
                         "Ratio = peer time / ours.")
        per_kind = {}
        for layer in layers:
            kind, name = layer[0], layer[1]
            ours_fn, xs, peers = make_layer(layer, batch, device)
            ours = common.measure(ours_fn, xs, device, quick=quick)
            timings = {}
            for pname, peer in peers.items():
                timings[pname] = common.skipped("no quantized engine") if peer is None else \
                    common.measure(peer[0], peer[1], device, quick=quick)
            row = sec.add_row("%s: %s" % (kind, name), ours, timings)
            for pname, r in row["ratios"].items():
                per_kind.setdefault(kind, {}).setdefault(pname, []).append(r)
        means = {kind: {p: geomean(v) for p, v in d.items()} for kind, d in per_kind.items()}
        summary["batch %d" % batch] = means
        for kind in KINDS:
            if kind in means:
                sec.notes.append("geomean %s: %s" % (kind, ", ".join(
                    "%s/ours %.2fx" % (p, m) if m else "%s/ours n/a" % p for p, m in means[kind].items())))
        if device.type == "cpu" and batch == 8:
            pw, dw = means.get("pointwise", {}).get("fp32"), means.get("depthwise", {}).get("fp32")
            sec.add_target("pointwise >= 2x faster than fp32 (geomean)", None if pw is None else pw >= 2.0,
                           "%.2fx" % pw if pw else "")
            sec.add_target("depthwise at least as fast as fp32 (geomean)", None if dw is None else dw >= 1.0,
                           "%.2fx" % dw if dw else "")
        sections.append(sec)
    return sections, summary


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    args = parser.parse_args()
    device, env = common.setup(args)
    sections, summary = run(device, args.quick, args.batches)
    for s in sections:
        s.notes.append("qkernels int8 ISA: %s" % qkernels_isa())
    common.publish(SCRIPT, sections, args, device, env)
    if args.json:
        doc = {"script": SCRIPT, "environment": env, "geomean_peer_over_ours": summary,
               "sections": [s.to_dict() for s in sections]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(common._nan_to_none(doc), indent=1) + "\n")


def qkernels_isa():
    import os

    return os.environ.get("QKERNELS_INT8_ISA") or "best available (amx > avx512_vnni > avx_vnni > avx2)"


if __name__ == "__main__":
    main()
