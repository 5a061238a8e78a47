"""Our ONNX QDQ export run by onnxruntime, as a peer of our int8 kernels: MobileNet-SSD 300x300 on the CPU.

Models, all from bench_int8_model's float model (random weights, non-trivial batch norms), calibrated on
the same images:
- ours static: QuantizeTranspiler(range_abs_max, fold_bn) -> convert_to_int8, our int8 kernels;
- onnxruntime, our export: ``qkernels.export_onnx`` of that very int8 model (standard QDQ), CPU execution
  provider, graph optimisation 'all', same thread count;
- onnxruntime, quantize_static: the float model exported and quantized by onnxruntime itself (QDQ, uint8
  activations, per-channel int8 weights): what onnxruntime runs as QLinearConv;
- float32: the float model in channels_last (PyTorch).

The notes record how many QLinearConv / ConvInteger nodes onnxruntime's optimiser made of each graph and
how far our export's outputs are from our int8 kernels'. Our export keeps our quantization exactly: each
QuantizeLinear has a Clip(-s, s) in front (codes stop at +-127; int8 QuantizeLinear alone would give -128),
which the exporter merges with a ReLU before it into Clip(0, s), and activations are symmetric int8 (zero
point 0). onnxruntime 1.31 fuses none of our Convs into QLinearConv: it runs float Conv on dequantized
tensors, so this row is a deployment check, not int8 speed. (Probe on a small net: with the Clips in front
of QuantizeLinear deleted, which also deletes the ReLUs and so changes the result, it makes QLinearConv of
every Conv: the Clip between Conv and QuantizeLinear is what blocks the fusion.)
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


def build_ours_in_onnxruntime(int8_model, example, threads: int):
    """(images -> outputs callable, op counts after onnxruntime's optimisation)."""
    from qkernels.export import export_onnx, onnxruntime_session

    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = export_onnx(int8_model, (example,), input_names=["images"],
                            dynamic_shapes={"images": {0: batch}})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "optimized.onnx")
        counts = optimized_op_counts(lambda p: onnxruntime_session(proto, threads=threads, optimized_model_path=p),
                                     path)
    session = onnxruntime_session(proto, threads=threads)

    def run(images):
        return session.run(None, {"images": images.numpy()})

    return run, counts


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
    ours_ort, ours_counts = build_ours_in_onnxruntime(ours, calib[0], threads)
    ort_static = build_onnxruntime(model, calib, threads)
    fns = {"ours static": lambda x, xcl: ours(x), "onnxruntime, our export": lambda x, xcl: ours_ort(x),
           "onnxruntime, quantize_static": ort_static if isinstance(ort_static, common.Timing)
           else (lambda x, xcl: ort_static(x)),
           "float32": (lambda m: lambda x, xcl: m(xcl))(copy.deepcopy(model).to(memory_format=torch.channels_last))}
    with torch.inference_mode():
        probe = calib[0]
        want = ours(probe)
        got = ours_ort(probe)
    diff = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want))
    scale = max(float(w.abs().max()) for w in want)
    sec = common.Section("onnx_export", "MobileNet-SSD %dx%d: our int8 kernels vs onnxruntime running our QDQ "
                         "export" % (args.size, args.size), ours_label="ours (int8 static)")
    sec.notes.append("onnxruntime's optimised graph of our export: %s" % dict(sorted(ours_counts.items())))
    sec.notes.append("our export vs our int8 kernels on the calibration batch: max |diff| %.3g (max |output| %.3g)"
                     % (diff, scale))
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
