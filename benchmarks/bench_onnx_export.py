"""Our ONNX QDQ export run by onnxruntime, as a peer of our int8 kernels: MobileNet-SSD 300x300 on the CPU.

Models, all from bench_int8_model's float model (random weights, non-trivial batch norms), calibrated on
the same images:
- ours static: QuantizeTranspiler(range_abs_max, fold_bn) -> convert_to_int8, our int8 kernels;
- onnxruntime, our export: ``qkernels.export_onnx`` of that very int8 model (standard QDQ, each quantized
  Conv a DequantizeLinear -> Conv -> QuantizeLinear unit with an int32 bias, int8 activations with zero
  point 0), CPU execution provider, graph optimisation 'all', same thread count. On x86 onnxruntime fuses
  units with int8 activations only when told to (``session.qdqisint8allowed``), so three rows:
  its default (float Conv on dequantized tensors), int8 QLinearConv (told to), and the export with
  ``activations="uint8"`` (code + 128, zero point 128: the same values), which its default fuses;
- onnxruntime, quantize_static: the float model exported and quantized by onnxruntime itself (QDQ, uint8
  activations, per-channel int8 weights);
- float32: the float model in channels_last (PyTorch).

The notes record the op counts of onnxruntime's optimised graph of each (QLinearConv: its integer
convolution) and how far each one's outputs are from our int8 kernels' (the random-weight SSD is deep:
a code that moves one step on a rounding tie, or by onnxruntime's own arithmetic, grows along the
layers; qkernels.parity_report shows per layer).
Batch 1 and 8, interleaved samples (common.measure_group); freed memory kept in the heap (mallopt) for
every model alike.
"""
import collections
import copy
import os
import tempfile
import warnings

import torch

from . import common
from .bench_int8_model import build_onnxruntime, build_ours, calibration_images, keep_freed_memory, seed_model

SCRIPT = "bench_onnx_export"


def optimized_op_counts(session_factory, path: str) -> collections.Counter:
    import onnx

    session_factory(path)
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def build_ours_in_onnxruntime(int8_model, example, threads: int, activations: str = "int8", int8_units: bool = False):
    """(images -> outputs callable, op counts after onnxruntime's optimisation)."""
    from qkernels.export import export_onnx, onnxruntime_session

    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(int8_model, (example,), input_names=["images"], activations=activations,
                            dynamic_shapes={"images": {0: batch}})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        counts = optimized_op_counts(lambda p: onnxruntime_session(proto, threads=threads, optimized_model_path=p,
                                                                   int8_units=int8_units), path)
    session = onnxruntime_session(proto, threads=threads, int8_units=int8_units)

    def run(images):
        return session.run(None, {"images": images.numpy()})

    return run, counts


# Our export in onnxruntime, three ways: label -> (activations, int8_units).
OUR_EXPORTS = {
    "onnxruntime, our export": ("int8", False),
    "onnxruntime, our export, int8 QLinearConv": ("int8", True),
    "onnxruntime, our export, uint8 QLinearConv": ("uint8", False),
}


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--size", type=int, default=300, help="image size (default 300)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="batch sizes (default 1 8)")
    args = parser.parse_args()
    malloc = keep_freed_memory()
    device, env = common.setup(args)
    if device.type != "cpu":
        raise SystemExit("bench_onnx_export: CPU only (onnxruntime's CPU execution provider)")
    env["malloc"] = malloc
    threads = torch.get_num_threads()
    model = seed_model()
    calib = calibration_images(4, args.size)
    ours = build_ours(model, calib, "range_abs_max")
    exports = {label: build_ours_in_onnxruntime(ours, calib[0], threads, act, units)
               for label, (act, units) in OUR_EXPORTS.items()}
    ort_static = build_onnxruntime(model, calib, threads)
    fns = {"ours static": lambda x, xcl: ours(x)}
    fns.update({label: (lambda run: lambda x, xcl: run(x))(run) for label, (run, _) in exports.items()})
    fns["onnxruntime, quantize_static"] = (ort_static if isinstance(ort_static, common.Timing)
                                           else (lambda x, xcl: ort_static(x)))
    fns["float32"] = (lambda m: lambda x, xcl: m(xcl))(copy.deepcopy(model).to(memory_format=torch.channels_last))
    sec = common.Section("onnx_export", "MobileNet-SSD %dx%d: our int8 kernels vs onnxruntime running our QDQ "
                         "export" % (args.size, args.size), ours_label="ours (int8 static)")
    with torch.inference_mode():
        probe = calib[0]
        want = ours(probe)
    scale = max(float(w.abs().max()) for w in want)
    for label, (run, counts) in exports.items():
        got = run(probe)
        diff = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))
        sec.notes.append("%s: onnxruntime's optimised graph %s; vs our int8 kernels on the calibration batch: "
                         "max |diff| %.3g (max |output| %.3g)" % (label, dict(sorted(counts.items())), diff, scale))
    sec.notes.append("Memory: %s; %d threads for every runtime; load average at start %s."
                     % (malloc, threads, "%.1f %.1f %.1f" % os.getloadavg()))
    for batch in args.batches:
        gen = torch.Generator().manual_seed(100 + batch)
        images = [torch.randn(batch, 3, args.size, args.size, generator=gen) for _ in range(2)]
        inputs = [(x, x.contiguous(memory_format=torch.channels_last)) for x in images]
        with torch.inference_mode():
            t = common.measure_group(fns, inputs, device, quick=args.quick, warmup=2,
                                     repeats=7 if args.quick else 15, max_total_s=3.0 if args.quick else 10.0)
        sec.add_row("batch %d" % batch, t.pop("ours static"), t)
    sec.notes.append("load average at end %s" % ("%.1f %.1f %.1f" % os.getloadavg()))
    common.publish(SCRIPT, [sec], args, device, env)


if __name__ == "__main__":
    main()
