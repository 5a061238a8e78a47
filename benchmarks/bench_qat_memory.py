"""Peak memory and time of a MobileNet-v1-SSD QAT training step, against the float step and torch.ao QAT.

One step = forward + ssd.loss.MultiBoxLoss + backward + SGD step, batch 8 at 300x300 by default, for
- float: the model as it is;
- ours: QuantizeTranspiler(range_abs_max).training_transpile, with ste="identity" (the reference) and
  ste="clip" (backward from the 1-bit mask of the forward pass), each also inside
  qkernels.recompute_fake_quant_outputs(), which lets the convs keep their fake-quantized inputs as a
  recipe instead of a tensor;
- torch.ao QAT: prepare_qat with the x86 default qconfig, unfused and with conv-bn-relu fused.
--autocast bf16 and --channels-last apply to every variant alike (the GPU configuration of gpu_check.sh).

Memory method: the peak, over the step, of the bytes of tensor storage the step itself allocated and
still holds (activations kept for backward, gradients, temporaries of the ops' outputs), sampled after
every operator by a TorchDispatchMode that tracks live storages (the CPU allocator keeps no statistics);
on CUDA also torch.cuda.max_memory_allocated() minus the allocation at the start of the step (the
allocator's own count, including its rounding and the ops' workspaces). The persistent bytes
(parameters, buffers, optimizer state) are listed apart: they are the same for every variant but the
quantizers' state. Ratios are to the float step. Target: every "ours" peak within 10% of the float
step's (a published measurement puts fixed fake-quant QAT at +51% over float for ResNet18, batch 128).
Times: median of interleaved steps; target on a GPU <= 1.1x the float step.
"""
import contextlib
import copy
import gc
import json
import math
import warnings
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import qkernels
from qkernels import QuantizeTranspiler

from . import common
from .bench_qat import make_batch, torch_ao_qat

SCRIPT = "bench_qat_memory"
MEMORY_LIMIT = 1.10
GPU_TIME_LIMIT = 1.10
MIB = 2.0**20


class LiveStorage(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive, sampled after every
    operator; `peak` is the largest sample. Views and in-place results share an input's storage and
    allocate nothing (a view of a parameter is not new memory)."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.live = {}  # data_ptr -> (weak reference, bytes)
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # an output sharing an input's storage (a view, an in-place result) allocated nothing
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == self.device.type:
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                entry = self.live.get(ptr)
                if ptr and ptr not in inputs and (entry is None or entry[0].expired()):  # addresses come back
                    self.live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self.live = {p: e for p, e in self.live.items() if not e[0].expired()}
        self.current = sum(nbytes for _, nbytes in self.live.values())
        self.peak = max(self.peak, self.current)
        return out


def persistent_bytes(model, optimizer) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    for state in optimizer.state.values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


class Variant:
    """A model and how one training step runs it."""

    def __init__(self, model, device, loss_fn, autocast, channels_last, recompute=False):
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device).to(memory_format=memory_format).train()
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-4, momentum=0.9)
        self.loss_fn, self.device, self.autocast, self.recompute = loss_fn, device, autocast, recompute
        self.memory_format = memory_format

    def step(self, images, boxes, labels):
        images = images.to(memory_format=self.memory_format)
        amp = (torch.autocast(self.device.type, dtype=torch.bfloat16) if self.autocast == "bf16"
               else contextlib.nullcontext())
        keep = qkernels.recompute_fake_quant_outputs() if self.recompute else contextlib.nullcontext()
        with keep, amp:
            locs, confs = self.model(images)
            loss = self.loss_fn(locs.float(), confs.float(), boxes, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def build_variants(args, device, loss_fn):
    from ssd.model import MobileNetSSD

    seed_model = MobileNetSSD(num_classes=21)
    options = dict(device=device, loss_fn=loss_fn, autocast=args.autocast, channels_last=args.channels_last)

    def ours(ste):
        return QuantizeTranspiler(activation_quantize_type="range_abs_max", ste=ste).training_transpile(
            copy.deepcopy(seed_model))

    variants = {"float": Variant(copy.deepcopy(seed_model), **options)}
    for ste in ("identity", "clip"):
        variants["ours ste=%s" % ste] = Variant(ours(ste), **options)
        variants["ours ste=%s + recompute" % ste] = Variant(ours(ste), recompute=True, **options)
    if not args.no_ao:
        for name, fuse in (("torch.ao QAT", False), ("torch.ao QAT fused", True)):
            try:
                variants[name] = Variant(torch_ao_qat(seed_model, fuse), **options)
            except Exception as exc:  # recorded in the table, the run goes on
                variants[name] = common.Timing(error=common.error_text(exc))
    return variants


def measure_memory(variant: Variant, batch, device):
    """{"tracked": peak bytes the step allocated (LiveStorage), "cuda": the allocator's peak over the
    allocation at step start (CUDA only), "persistent": parameters, buffers and optimizer state}."""
    variant.step(*batch)  # warm-up: optimizer state, quantizer state, allocator
    variant.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    common.synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    tracker = LiveStorage(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with tracker:
            variant.step(*batch)
    common.synchronize(device)
    result = {"tracked": tracker.peak, "persistent": persistent_bytes(variant.model, variant.optimizer)}
    if device.type == "cuda":
        result["cuda"] = torch.cuda.max_memory_allocated(device) - start
    variant.optimizer.zero_grad(set_to_none=True)
    return result


class MemorySection(common.Section):
    """A timing table whose JSON also carries the memory figures (the markdown shows them in the notes)."""

    memory: dict = None

    def to_dict(self):
        d = super().to_dict()
        d["memory_bytes"] = self.memory
        return d


def memory_table(memory, device) -> list:
    keys = ["tracked"] + (["cuda"] if device.type == "cuda" else [])
    head = "| variant | " + " | ".join("step peak MiB (%s)" % k for k in keys) + " | vs float | persistent MiB |"
    lines = ["Peak memory of one step (method in the script's docstring: `tracked` = live tensor storages the "
             "step allocated, sampled after every op; `cuda` = the CUDA allocator's peak):", "", head,
             "|" + "---|" * (len(keys) + 3)]
    base = memory.get("float", {}).get(keys[-1])
    for name, m in memory.items():
        if "error" in m:
            lines.append("| %s | %s |" % (name, m["error"][:200].replace("|", "\\|")))
            continue
        rel = m[keys[-1]] / base if base else math.nan
        lines.append("| %s | %s | %.2fx | %.1f |" % (name, " | ".join("%.1f" % (m[k] / MIB) for k in keys), rel,
                                                   m["persistent"] / MIB))
    return lines


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 8; 2 with --quick)")
    parser.add_argument("--size", type=int, default=300, help="image size (default 300)")
    parser.add_argument("--autocast", choices=("none", "bf16"), default="none", help="autocast dtype (default none)")
    parser.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    parser.add_argument("--no-ao", action="store_true", help="skip the torch.ao QAT peers")
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    device, env = common.setup(args)
    if args.batch is None:
        args.batch = 2 if args.quick else 8
    from ssd.loss import MultiBoxLoss

    loss_fn = MultiBoxLoss(num_classes=21).to(device)
    variants = build_variants(args, device, loss_fn)
    batches = [tuple(t.to(device) if isinstance(t, torch.Tensor) else [b.to(device) for b in t]
                     for t in make_batch(args.batch, args.size, seed)) for seed in range(2)]

    memory = {}
    for name, v in variants.items():
        if isinstance(v, common.Timing):
            memory[name] = {"error": v.error}
            continue
        try:
            memory[name] = measure_memory(v, batches[0], device)
        except Exception as exc:
            common.synchronize_quietly(device)
            memory[name] = {"error": common.error_text(exc)}
            variants[name] = common.Timing(error=common.error_text(exc))
    fns = {name: (v if isinstance(v, common.Timing) else v.step) for name, v in variants.items()}
    timings = common.measure_group(fns, batches, device, quick=args.quick, warmup=1, repeats=3 if args.quick else 5,
                                   min_sample_s=0.0, max_total_s=1e9)

    config = "batch %d, %dx%d%s%s" % (args.batch, args.size, args.size,
                                      ", bf16 autocast" if args.autocast == "bf16" else "",
                                      ", channels_last" if args.channels_last else "")
    sec = MemorySection("qat_step_memory", "MobileNet-SSD training step: peak memory and time (%s)" % config,
                        ours_label="step time")
    sec.memory = memory
    sec.notes += memory_table(memory, device) + [""]
    sec.notes.append("Time table: each variant's step; in brackets float step time / its time (below 1: slower "
                     "than float).")
    for name in variants:
        sec.add_row(name, timings[name], {"float": timings["float"]} if name != "float" else {})
    key = "cuda" if device.type == "cuda" else "tracked"
    base = memory.get("float", {}).get(key)
    for name, m in memory.items():
        if not name.startswith("ours"):
            continue
        rel = m[key] / base if base and key in m else None
        sec.add_target("%s: step peak memory <= %.2fx the float step's" % (name, MEMORY_LIMIT),
                       None if rel is None else rel <= MEMORY_LIMIT, "" if rel is None else "%.2fx" % rel)
        if device.type == "cuda":
            r = common.ratio(timings[name], timings["float"])
            sec.add_target("%s: step time <= %.1fx the float step's" % (name, GPU_TIME_LIMIT),
                           None if r is None else r <= GPU_TIME_LIMIT, "" if r is None else "%.2fx" % r)
    common.publish(SCRIPT, [sec], args, device, env)
    if args.json:
        common.write_atomic(Path(args.json), json.dumps(common._nan_to_none(sec.to_dict()), indent=1) + "\n")


if __name__ == "__main__":
    main()
