"""The whole int8 MobileNet-v1-SSD 300x300 on the CPU: ours against the other int8 runtimes, same run.

Models, all from one float model with random weights, calibrated on the same images:
- ours static: QuantizeTranspiler(range_abs_max, fold_bn) -> convert_to_int8 (BN folded, ReLU fused,
  int8 codes passed between layers where the scales allow);
- ours dynamic: the same with abs_max activations (scale per batch, computed at run time);
- torch.ao: FX graph mode, prepare_fx / convert_fx with get_default_qconfig_mapping("x86") (the x86
  engine: fbgemm / oneDNN), calibrated by one forward over the calibration images;
- onnxruntime: the float model exported to ONNX, quantize_static (QDQ, uint8 activations, int8
  weights, per channel) over the same images, CPU execution provider with the same thread count
  (skipped when onnxruntime is not installed);
- float32: the float model in channels_last.
Batch 1 and 8, torch.inference_mode, the models' samples interleaved (common.measure_group).

Then every conv, ours against torch.ao's counterpart (same module path), each on the input it gets
inside its model (captured by a forward pre-hook), interleaved: which layers are ahead and behind. Where
ours takes a float input (the stem quantizes the image itself), torch.ao's conv is timed together with the
quantize_per_tensor node its model runs before it, so that both start from the same float input.
The table also counts the convs whose input arrives as int8 codes (chained) in our static model, and the
convs of our dynamic model that quantize with the abs max their producer handed over.

Freed memory is kept in the process heap (glibc mallopt, see keep_freed_memory) for every model alike,
so that page faults of fresh allocations do not dominate; the setting is recorded with the tables.

Targets: the whole static int8 model >= 1.3x torch.ao's at batch 1 and 8; dynamic int8 >= 3.5x
float32 at batch 8; no conv below 0.9x torch.ao's.
"""
import copy
import ctypes
import io
import math
import os
import warnings

import torch
from torch import nn

from qkernels import QuantizeTranspiler
from ssd.model import MobileNetSSD

from . import common

SCRIPT = "bench_int8_model"
AO_TARGET = 1.3
DYNAMIC_TARGET = 3.5
LAYER_FLOOR = 0.9

# glibc mallopt parameters
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4


def keep_freed_memory() -> str:
    """Serve every allocation from the heap (no mmap) and never give freed memory back to the system:
    a fresh megabyte-sized tensor then reuses pages that are already mapped instead of faulting them in
    again on every call. Returns the setting as text for the tables."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError as exc:
        return "mallopt unavailable (%s)" % common.error_text(exc)
    ok = [libc.mallopt(_M_MMAP_MAX, 0), libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1), libc.mallopt(_M_TOP_PAD, 64 << 20)]
    if not all(ok):
        return "mallopt failed (%s)" % ok
    return "glibc mallopt M_MMAP_MAX=0 M_TRIM_THRESHOLD=2^31-1 M_TOP_PAD=64MiB (all models alike)"


# --- models --------------------------------------------------------------------------------------

class Traceable(nn.Module):
    """MobileNetSSD.forward without its input check, which FX symbolic tracing cannot follow."""

    def __init__(self, model: MobileNetSSD):
        super().__init__()
        self.m = model

    def forward(self, images):
        m, batch = self.m, images.shape[0]
        locs, confs = [], []
        for feature, loc_head, conf_head in zip(m.feature_maps(images), m.loc_heads, m.conf_heads):
            locs.append(loc_head(feature).permute(0, 2, 3, 1).reshape(batch, -1, 4))
            confs.append(conf_head(feature).permute(0, 2, 3, 1).reshape(batch, -1, m.num_classes))
        return torch.cat(locs, dim=1), torch.cat(confs, dim=1)


def seed_model() -> MobileNetSSD:
    """Random weights with non-trivial batch-norm statistics (so folding them matters)."""
    torch.manual_seed(0)
    model = MobileNetSSD(num_classes=21)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.2 - 0.1)
    return model.eval()


def calibration_images(count: int, size: int):
    gen = torch.Generator().manual_seed(7)
    return [torch.randn(2, 3, size, size, generator=gen) for _ in range(count)]


def build_ours(model, calib, kind: str):
    t = QuantizeTranspiler(activation_quantize_type=kind, fold_bn=True)
    qat = t.training_transpile(copy.deepcopy(model)).train()
    with torch.no_grad():
        for images in calib:
            qat(images)
    return t.convert_to_int8(qat.eval(), example_inputs=(calib[0],))


def build_torch_ao(model, calib):
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():  # torch.ao.quantization announces its deprecation on every call
        warnings.simplefilter("ignore")
        prepared = prepare_fx(Traceable(copy.deepcopy(model)).eval(), get_default_qconfig_mapping("x86"), (calib[0],))
        with torch.no_grad():
            for images in calib:
                prepared(images)
        converted = convert_fx(prepared)
    return converted


class _CalibrationReader:
    def __init__(self, calib):
        self.items = iter([{"images": images.numpy()} for images in calib])

    def get_next(self):
        return next(self.items, None)


def build_onnxruntime(model, calib, threads: int):
    """A callable images -> outputs, or a skipped/failed Timing saying why there is none."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    except ImportError as exc:
        return common.skipped("onnxruntime not installed (%s)" % common.error_text(exc))
    import tempfile

    reader = type("Reader", (_CalibrationReader, CalibrationDataReader), {})(calib)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32_path, int8_path = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
        torch.onnx.export(Traceable(copy.deepcopy(model)).eval(), (calib[0],), fp32_path, dynamo=False,
                          input_names=["images"], output_names=["locs", "confs"],
                          dynamic_axes={"images": {0: "batch"}}, opset_version=17)
        quantize_static(fp32_path, int8_path, reader, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(int8_path, options, providers=["CPUExecutionProvider"])

    def run(images):
        return session.run(None, {"images": images.numpy()})

    return run


def int8_convs(model):
    from qkernels.nn.int8_layers import Int8Conv2d

    return [(name, m) for name, m in model.named_modules() if isinstance(m, Int8Conv2d)]


def forward_seeing_inputs(model, modules, example, see) -> None:
    """One inference forward of model(example), calling see(name, input) as each of `modules` ({name: module})
    is called."""
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: see(name, args[0])) for name, m in modules.items()]
    try:
        with torch.inference_mode():
            model(example)
    finally:
        for h in hooks:
            h.remove()


def chained_counts(model, example):
    """(convs whose input arrives as int8 codes, all convs) in one forward of `model`."""
    convs = dict(int8_convs(model))
    seen = {}
    forward_seeing_inputs(model, convs, example, lambda name, x: seen.__setitem__(name, x.dtype))
    return sum(dt == torch.int8 for dt in seen.values()), len(convs)


def handed_counts(model, example):
    """(convs of a dynamic model whose input's abs max its producer handed over, those of them whose input
    came as int8 codes at that scale) in one forward of `model`."""
    convs = dict(int8_convs(model))
    scope = next((m.chain_scope for m in convs.values() if m.chain_scope is not None), None)
    if scope is None:
        return 0, 0
    handed, codes = set(), set()

    def see(name, x):
        if scope.handed_abs_max(x) is not None:
            handed.add(name)
            if x.dtype == torch.int8:
                codes.add(name)

    forward_seeing_inputs(model, convs, example, see)
    return len(handed), len(codes)


# --- per layer -----------------------------------------------------------------------------------

def captured_inputs(model, modules, example):
    """{name: the input each module got in one forward of model(example)}."""
    got = {}
    forward_seeing_inputs(model, modules, example, got.__setitem__)
    return got


def ao_conv_modules(ao_model):
    from torch.ao.nn.quantized import Conv2d as QConv2d

    return {name[len("m."):]: m for name, m in ao_model.named_modules() if isinstance(m, QConv2d)}


def conv_label(name, m):
    k = "%dx%d" % tuple(m.kernel_size)
    kind = "dw" if m.groups == m.in_channels and m.groups > 1 else k
    return "%s %s %d->%d s%d" % (name, kind, m.in_channels, m.out_channels, m.stride[0])


def as_in_its_model(layer):
    """layer(x) as the converted model calls it: inside its chain scope, so a chained layer writes int8 codes
    (called alone it writes the floats they stand for, four times the bytes: not what runs in the model)."""
    scope = layer.chain_scope
    if scope is None:
        return lambda x: layer(x)

    def run(x):
        with scope:
            return layer(x)

    return run


def bench_layers(args, device, ours_model, ao_model, batch, size):
    example = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(11))
    ours_mods = dict(int8_convs(ours_model))
    ao_mods = ao_conv_modules(ao_model)
    ours_in = captured_inputs(ours_model, ours_mods, example)
    ao_in = captured_inputs(ao_model, ao_mods, example)
    sec = common.Section("int8_layers_b%d" % batch, "Every conv of the int8 model, batch %d: ours vs torch.ao" % batch,
                         ours_label="ours (int8 static)")
    sec.notes.append("Each layer on the input it gets inside its model, writing what it writes there: ours int8 "
                     "codes in where the producer is chained (else float, quantized inside the layer: marked "
                     "'float in', and torch.ao's time then includes the quantize_per_tensor before its conv) and int8 "
                     "codes out where it is chained itself, torch.ao quint8; map size is the layer's input.")
    ratios = []
    for name, mod in ours_mods.items():
        x = ours_in.get(name)
        if x is None:
            continue
        peer = ao_mods.get(name)
        peers = {}
        fns = {"ours": as_in_its_model(mod)}
        if peer is not None and name in ao_in:
            q = ao_in[name]
            if x.dtype != torch.int8 and q.is_quantized:
                # ours quantizes its float input inside the layer; torch.ao's model has a quantize node before
                # its conv, which is timed with it here so that both start from the same float input
                fns["torch.ao"] = (lambda m, xf, s, z, dt: lambda _: m(torch.quantize_per_tensor(xf, s, z, dt)))(
                    peer, x, q.q_scale(), q.q_zero_point(), q.dtype)
            else:
                fns["torch.ao"] = (lambda m, t: lambda _: m(t))(peer, q)
        with torch.inference_mode():
            t = common.measure_group(fns, [x], device, quick=True, repeats=5 if args.quick else 9,
                                     max_total_s=0.4 if args.quick else 1.0)
        ours_t = t.pop("ours")
        peers.update(t)
        label = "%s @%d%s" % (conv_label(name, mod), x.shape[-1], "" if x.dtype == torch.int8 else " (float in)")
        row = sec.add_row(label, ours_t, peers)
        r = row["ratios"].get("torch.ao")
        if r is not None:
            ratios.append((r, label))
    if ratios:
        worst = min(ratios)
        behind = [label for r, label in ratios if r < 1.0]
        sec.notes.append("ahead of torch.ao on %d of %d convs; behind on: %s" % (
            len(ratios) - len(behind), len(ratios), ", ".join(behind) or "none"))
        sec.add_target("no conv below %.1fx torch.ao (batch %d)" % (LAYER_FLOOR, batch), worst[0] >= LAYER_FLOOR,
                       "slowest %.2fx: %s" % worst)
    return sec


# --- whole model ---------------------------------------------------------------------------------

def bench_models(args, device, models, batches, size, notes):
    sec = common.Section("int8_model", "Whole MobileNet-SSD %dx%d, int8 runtimes and float32" % (size, size),
                         ours_label="ours (int8 static)")
    sec.notes.extend(notes)
    fns = {}
    for name, m in models.items():
        if isinstance(m, common.Timing) or callable(m) and not isinstance(m, nn.Module):
            fns[name] = m
        else:
            fns[name] = (lambda model: lambda images: model(images))(m)
    summary = {}
    for batch in batches:
        gen = torch.Generator().manual_seed(100 + batch)
        images = [torch.randn(batch, 3, size, size, generator=gen) for _ in range(2)]
        inputs = [(x, x.contiguous(memory_format=torch.channels_last)) for x in images]
        # float32 reads the channels_last copy, the others the plain tensor
        wrapped = {n: (f if isinstance(f, common.Timing) else
                       (lambda fn, cl: lambda x, xcl: fn(xcl if cl else x))(f, n == "float32"))
                   for n, f in fns.items()}
        with torch.inference_mode():
            t = common.measure_group(wrapped, inputs, device, quick=args.quick, warmup=2,
                                     repeats=7 if args.quick else 15, max_total_s=3.0 if args.quick else 10.0)
        ours = t.pop("ours static")
        row = sec.add_row("batch %d" % batch, ours, t)
        ao = row["ratios"].get("torch.ao")
        sec.add_target("static int8 >= %.1fx torch.ao's int8 model, batch %d" % (AO_TARGET, batch),
                       None if ao is None else ao >= AO_TARGET, "" if ao is None else "%.2fx" % ao)
        dyn = common.ratio(t["float32"], t["ours dynamic"]) if "ours dynamic" in t else None
        if batch == 8:
            sec.add_target("dynamic int8 >= %.1fx float32, batch 8" % DYNAMIC_TARGET,
                           None if dyn is None else dyn >= DYNAMIC_TARGET, "" if dyn is None else "%.2fx" % dyn)
        summary["batch %d" % batch] = dict(row["ratios"], dynamic_over_float32=dyn)
        sec.notes.append("batch %d: dynamic int8 %s float32" % (
            batch, "n/a" if dyn is None else "%.2fx faster than" % dyn))
    return sec, summary


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--size", type=int, default=300, help="image size (default 300)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    parser.add_argument("--no-layers", action="store_true", help="skip the per-layer tables")
    parser.add_argument("--no-onnxruntime", action="store_true", help="skip the onnxruntime peer")
    args = parser.parse_args()
    malloc = keep_freed_memory()
    device, env = common.setup(args)
    if device.type != "cpu":
        raise SystemExit("bench_int8_model: CPU only (the peers are CPU runtimes)")
    env["malloc"] = malloc
    model = seed_model()
    calib = calibration_images(4, args.size)
    models = {
        "ours static": build_ours(model, calib, "range_abs_max"),
        "ours dynamic": build_ours(model, calib, "abs_max"),
        "torch.ao": build_torch_ao(model, calib),
        "onnxruntime": common.skipped("--no-onnxruntime") if args.no_onnxruntime else None,
        "float32": copy.deepcopy(model).to(memory_format=torch.channels_last),
    }
    if models["onnxruntime"] is None:
        try:
            models["onnxruntime"] = build_onnxruntime(model, calib, torch.get_num_threads())
        except Exception as exc:  # recorded in the table, the run goes on
            models["onnxruntime"] = common.Timing(error=common.error_text(exc))
    chained, total = chained_counts(models["ours static"], calib[0])
    handed, handed_codes = handed_counts(models["ours dynamic"], calib[0])
    notes = [
        "ours static: range_abs_max, BN folded, ReLU fused; %d of %d convs get int8 codes from their producer "
        "(torch.ao passes quint8 between all its quantized ops)." % (chained, total),
        "ours dynamic: abs_max (scale = max|x| of each batch, at run time); %d of %d convs get their input's abs "
        "max from its producer (no reduction pass of their own), %d of them as int8 codes at that scale (the "
        "producer's kernels run a second pass after one for the max alone where that is cheaper than a float "
        "tensor in between)."
        % (handed, total, handed_codes),
        "torch.ao: FX prepare_fx/convert_fx, get_default_qconfig_mapping('x86'), engine x86; onnxruntime: "
        "quantize_static QDQ u8/s8 per channel, CPUExecutionProvider; float32: channels_last. All calibrated "
        "on the same %d images." % (2 * len(calib)),
        "Memory: %s. OMP_WAIT_POLICY=%s." % (malloc, os.environ.get("OMP_WAIT_POLICY", "unset")),
    ]
    sections = []
    sec, _ = bench_models(args, device, models, args.batches, args.size, notes)
    sections.append(sec)
    if not args.no_layers:
        # --quick (run_all): the per-layer table at the smallest batch only, to fit run_all's time budget
        for batch in args.batches[:1] if args.quick else args.batches:
            sections.append(bench_layers(args, device, models["ours static"], models["torch.ao"], batch, args.size))
    common.publish(SCRIPT, sections, args, device, env)


if __name__ == "__main__":
    main()
