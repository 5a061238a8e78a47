"""int8 conv / linear / whole MobileNet-SSD on the GPU: qkernels' tensor-core kernels against cuDNN and cuBLAS
in the same run (benchmarks/gpu_check.sh runs it on a GPU day; `--device cpu` runs the same tables on the CPU
kernels, reduced, to check the script).

Tables (batch 1 and 64 on CUDA; batch 1 on the CPU):
- convs: every distinct conv of MobileNet-v1-SSD 300x300 and four ResNet-50 convs. Ours: conv2d_int8 on
  channels-last int8 input, weights packed once (pack_conv2d_int8_weight, conv2d_int8_packed), the epilogue a
  model uses (per-channel scale, bias, ReLU, int8 out; the SSD heads: bias, float32 out). Peers: F.conv2d with
  bias on channels-last fp16 and bf16 (cuDNN; on the CPU fp32 and bf16, oneDNN), without the ReLU. Shown as
  time and TOPS (2 * MACs / time) and peer time / ours.
- linear: linear_int8 with int32 output against torch._int_mm (the same int8 x int8 -> int32 product,
  cuBLASLt) and F.linear in fp16.
- the whole model: MobileNet-SSD converted by QuantizeTranspiler (range_abs_max, BN folded, ReLU fused,
  calibrated on random images) against the float model in fp16 (cuDNN, channels-last, eager, batch norm
  as its own kernel) and the same with each batch norm folded into its conv.

Targets (CUDA): int8 pointwise convs >= 1.3x cuDNN fp16 at batch 64 (geomean); the whole int8 model >= 1.2x
fp16 at batch 64.

Options beyond the common ones: --batches (default 1 64 on CUDA, 1 on the CPU), --skip-model.
"""
import copy
import ctypes
import os

import torch
import torch.nn.functional as F
from torch import nn

import qkernels

from . import common
from .bench_conv_int8 import QUICK_NAMES, geomean, mobilenet_ssd_convs
from .bench_int8_model import seed_model  # the same random-weight model as the CPU benchmark

SCRIPT = "bench_conv_int8_gpu"
POINTWISE_TARGET = 1.3
MODEL_TARGET = 1.2

# (kind, name, C, O, map size, kernel, stride, groups, bias) as mobilenet_ssd_convs
RESNET50_CONVS = [
    ("resnet50", "res2 1x1 256->64 @56", 256, 64, 56, 1, 1, 1, False),
    ("resnet50", "res2 3x3 64->64 @56", 64, 64, 56, 3, 1, 1, False),
    ("resnet50", "res4 1x1 1024->256 @14", 1024, 256, 14, 1, 1, 1, False),
    ("resnet50", "res5 3x3 512->512 @7", 512, 512, 7, 3, 1, 1, False),
]
LINEAR_SHAPES = [(1, 1024, 1024), (64, 1024, 1024), (64, 4096, 4096), (1024, 1024, 1024), (4096, 4096, 4096)]


def keep_freed_memory(device) -> str:
    """CPU runs: serve allocations from the heap and keep freed memory there (glibc mallopt), ours and the
    peers alike, so page faults of fresh buffers do not dominate. Returns the setting for the tables."""
    if device.type != "cpu":
        return "n/a (GPU: torch's caching allocator)"
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = [libc.mallopt(-4, 0), libc.mallopt(-1, 2 ** 31 - 1), libc.mallopt(-2, 64 << 20)]
    except (OSError, AttributeError) as exc:
        return "mallopt unavailable (%s)" % common.error_text(exc)
    return "glibc mallopt M_MMAP_MAX=0 M_TRIM_THRESHOLD=2^31-1 M_TOP_PAD=64MiB" if all(ok) else "mallopt failed"


def float_peers(device):
    return [("fp16", torch.float16), ("bf16", torch.bfloat16)] if device.type == "cuda" else \
        [("fp32", torch.float32), ("bf16", torch.bfloat16)]


def tops(macs, t):
    return 2 * macs / t.median_s / 1e12 if t.ok and t.median_s > 0 else None


# --- convs ------------------------------------------------------------------------------------------

def conv_case(layer, batch, device):
    kind, name, c, o, size, k, s, g, has_bias = layer
    gen = torch.Generator().manual_seed(0)
    pad = k // 2
    w8 = torch.randint(-127, 128, (o, c // g, k, k), dtype=torch.int8, generator=gen)
    bias = torch.randn(o, generator=gen).to(device)
    scale = (torch.rand(o, generator=gen) * 1e-3).to(device)
    out_size = (size + 2 * pad - k) // s + 1
    macs = batch * out_size * out_size * o * (c // g) * k * k
    nbytes = batch * c * size * size
    xs = common.rotating(lambda: torch.randint(-128, 128, (batch, c, size, size), dtype=torch.int8, device=device)
                         .contiguous(memory_format=torch.channels_last), common.buffer_count(4 * nbytes))
    w8d = w8.to(device)
    packed = qkernels.pack_conv2d_int8_weight(w8d, g)
    out_dtype, act = (torch.float32, None) if kind == "head" else (torch.int8, "relu")

    def ours(x):
        return qkernels.conv2d_int8_packed(x, w8d, packed, bias, stride=s, padding=pad, groups=g, scale=scale,
                                           out_dtype=out_dtype, activation=act)

    fns, inputs = {"ours": ours}, {}
    for pname, dtype in float_peers(device):
        wf = w8.to(device, dtype).contiguous(memory_format=torch.channels_last)
        bf = bias.to(dtype)
        fns[pname] = (lambda wf, bf: lambda x: F.conv2d(x, wf, bf, s, pad, 1, g))(wf, bf)
        inputs[pname] = [x.to(dtype).contiguous(memory_format=torch.channels_last) for x in xs]
    return fns, xs, inputs, macs


def run_convs(device, quick, batches):
    layers = mobilenet_ssd_convs() + RESNET50_CONVS
    if quick and device.type == "cpu":
        layers = [l for l in layers if l[1] in QUICK_NAMES] + RESNET50_CONVS[-1:]
    sections, means = [], {}
    for batch in batches:
        sec = common.Section("conv_int8_gpu_b%d" % batch, "Convs, batch %d: conv2d_int8 vs %s" % (
            batch, " / ".join(p for p, _ in float_peers(device))))
        sec.notes.append("ours: int8 in, weights packed once, per-channel scale + bias + relu -> int8 "
                         "(heads: bias -> float32); peers: F.conv2d + bias, channels-last, no relu. "
                         "Ratio = peer time / ours.")
        per_kind, tops_notes = {}, []
        for layer in layers:
            fns, xs, peer_inputs, macs = conv_case(layer, batch, device)
            timings = {"ours": common.measure(fns.pop("ours"), xs, device, quick=quick)}
            for pname, fn in fns.items():
                timings[pname] = common.measure(fn, peer_inputs[pname], device, quick=quick)
            ours = timings.pop("ours")
            row = sec.add_row("%s: %s" % (layer[0], layer[1]), ours, timings)
            for pname, r in row["ratios"].items():
                per_kind.setdefault(layer[0], {}).setdefault(pname, []).append(r)
            cells = ["ours %s" % _tops_text(tops(macs, ours))] + [
                "%s %s" % (p, _tops_text(tops(macs, t))) for p, t in timings.items()]
            tops_notes.append("TOPS %s: %s" % (layer[1], ", ".join(cells)))
        means[batch] = {kind: {p: geomean(v) for p, v in d.items()} for kind, d in per_kind.items()}
        for kind, m in means[batch].items():
            sec.notes.append("geomean %s: %s" % (kind, ", ".join(
                "%s/ours %.2fx" % (p, v) if v else "%s/ours n/a" % p for p, v in m.items())))
        sec.notes += tops_notes
        if device.type == "cuda" and batch == 64:
            pw = means[batch].get("pointwise", {}).get("fp16")
            sec.add_target("pointwise >= %.1fx cuDNN fp16 (geomean)" % POINTWISE_TARGET,
                           None if pw is None else pw >= POINTWISE_TARGET, "%.2fx" % pw if pw else "")
        sections.append(sec)
    return sections


def _tops_text(v):
    return "%.3g" % v if v is not None else "-"


# --- linear -------------------------------------------------------------------------------------------

def run_linear(device, quick):
    sec = common.Section("linear_int8_gpu", "linear_int8 (int32 out) vs torch._int_mm and fp16 F.linear")
    sec.notes.append("[M, K] x [N, K]^T -> [M, N]; torch._int_mm takes the same int8 operands (weights "
                     "transposed as a view) and also returns int32. Ratio = peer time / ours.")
    shapes = LINEAR_SHAPES if device.type == "cuda" else LINEAR_SHAPES[:2]
    for m, k, n in shapes:
        gen = torch.Generator().manual_seed(m)
        xs = [torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=gen).to(device) for _ in range(2)]
        w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen).to(device)
        wt = w.t()
        fdtype = torch.float16 if device.type == "cuda" else torch.float32
        wf = w.to(fdtype)
        ours = common.measure(lambda x: qkernels.linear_int8(x, w, out_dtype=torch.int32), xs, device, quick=quick)
        peers = {"torch._int_mm": common.measure(lambda x: torch._int_mm(x, wt), xs, device, quick=quick),
                 "F.linear %s" % str(fdtype).split(".")[1]: common.measure(lambda x: F.linear(x, wf),
                                                                           [x.to(fdtype) for x in xs], device,
                                                                           quick=quick)}
        sec.add_row("M=%d K=%d N=%d (ours %s TOPS)" % (m, k, n, _tops_text(tops(m * k * n, ours))), ours, peers)
    return [sec]


# --- the whole model ------------------------------------------------------------------------------------

def int8_model(model, device):
    from qkernels import QuantizeTranspiler

    t = QuantizeTranspiler(activation_quantize_type="range_abs_max", fold_bn=True)
    qat = t.training_transpile(copy.deepcopy(model).to(device)).train()
    gen = torch.Generator().manual_seed(7)
    calib = [torch.randn(2, 3, 300, 300, generator=gen).to(device) for _ in range(3)]
    with torch.no_grad():
        for images in calib:
            qat(images)
    try:  # chains layers across branches where the transpiler can (example_inputs: newer transpilers)
        return t.convert_to_int8(qat.eval(), example_inputs=(calib[0],))
    except TypeError:
        return t.convert_to_int8(qat.eval())


def folded_bn(model):
    """The float model with every BatchNorm2d that directly follows a conv folded into it."""
    model = copy.deepcopy(model)
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                seq._modules[a] = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    return model


def run_model(device, quick, batches):
    model = seed_model()
    ours = int8_model(model, device)
    chained = sum(1 for m in ours.modules() if getattr(m, "chained", False))
    fdtype = torch.float16 if device.type == "cuda" else torch.float32
    fname = str(fdtype).split(".")[1]
    peers_models = {fname: model, fname + " BN folded": folded_bn(model)}
    peers_models = {k: m.to(device, fdtype).to(memory_format=torch.channels_last) for k, m in peers_models.items()}
    sec = common.Section("int8_model_gpu", "MobileNet-SSD 300x300: int8 (ours) vs %s" % fname)
    sec.notes.append("ours: QuantizeTranspiler(range_abs_max, fold_bn) -> convert_to_int8, float32 images in "
                     "(quantized by the first layer), %d convs chained (int8 codes between layers); peers: the "
                     "float model in %s, channels-last, eager. Ratio = peer time / ours." % (chained, fname))
    for batch in batches:
        gen = torch.Generator().manual_seed(batch)
        images = [torch.randn(batch, 3, 300, 300, generator=gen).to(device) for _ in range(2)]
        with torch.inference_mode():
            t_ours = common.measure(ours, images, device, quick=quick)
            peers = {name: common.measure(m, [x.to(fdtype).contiguous(memory_format=torch.channels_last)
                                              for x in images], device, quick=quick)
                     for name, m in peers_models.items()}
        row = sec.add_row("batch %d" % batch, t_ours, peers)
        if device.type == "cuda" and batch == 64:
            r = row["ratios"].get(fname)
            sec.add_target("whole int8 model >= %.1fx fp16 at batch 64" % MODEL_TARGET,
                           None if r is None else r >= MODEL_TARGET, "%.2fx" % r if r else "")
    return [sec]


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="batch sizes (default 1 64 on CUDA, 1 on the CPU)")
    parser.add_argument("--skip-model", action="store_true", help="leave out the whole-model table")
    args = parser.parse_args()
    device, env = common.setup(args)
    heap = keep_freed_memory(device)
    batches = args.batches or ([1, 64] if device.type == "cuda" else [1])
    sections = run_convs(device, args.quick, batches) + run_linear(device, args.quick)
    if not args.skip_model:
        sections += run_model(device, args.quick, batches)
    for s in sections:
        s.notes.append("heap: %s; QKERNELS_CUDA_INT8_KERNEL=%s" % (heap, os.environ.get("QKERNELS_CUDA_INT8_KERNEL",
                                                                                       "auto")))
    common.publish(SCRIPT, sections, args, device, env)


if __name__ == "__main__":
    main()
