"""Fake-quant kernels of qkernels against PyTorch.

Peers: PyTorch eager (x.abs().max() + torch.fake_quantize_per_tensor_affine, as in
qkernels.reference), the same composition under torch.compile, torch.fused_moving_avg_obs_fake_quant
(PyTorch's fused QAT observer + fake quant: what torch.ao's QAT FakeQuantize runs per op) where it does
comparable work, and x.clone(), the memory-traffic floor of an op that reads x once and writes one
tensor like it.

CPU (float32, 1M and 16M elements). Targets: at 16M >= 3x faster than eager and within 2x of the copy's
time, at 1M >= 5x faster than eager.

GPU (--device cuda): per-tensor dynamic, with a given scale and channel-wise (rows of 4096, axis 0), in
float32, bfloat16 and float16, at 1M, 16M and 256M elements, as TB/s of the bytes each op must move
(dynamic and channel-wise: read x twice, write once; with a scale: read once, write once) and as % of the
device's HBM limit (memory clock x bus width, or the nominal figure of the model). Targets: >= 85% of the
HBM limit at 16M+ in every dtype; >= 3x faster than torch's fused observer + fake quant.
"""
import math
import time

import torch

import qkernels
from qkernels.reference import bin_count, eager_fake_quant_abs_max

from . import common

SCRIPT = "bench_fake_quant"
BITS = 8
SIZES = {"1M": 1 << 20, "16M": 1 << 24}
GPU_SIZES = {"1M": 1 << 20, "16M": 1 << 24, "256M": 1 << 28}
GPU_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GPU_ROW = 4096  # channel-wise on the GPU: [n / 4096, 4096] along axis 0 (a weight's output channels)
HBM_LIMIT = 0.85
FUSED_SPEEDUP = 3.0
# Nominal HBM bandwidth (GB/s) by device name, where the driver does not report the memory clock.
NOMINAL_HBM_GBPS = [("H200", 4800), ("GH200", 4000), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
                    ("H20", 4000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555)]
CONV_WEIGHTS = {"[1024,1024,1,1]": (1024, 1024, 1, 1), "[512,256,3,3]": (512, 256, 3, 3)}
WINDOW_SIZE = 10000  # reference default for range_abs_max


# --- PyTorch peers -----------------------------------------------------------------------------------

def eager_fake_quant_detached_scale(x: torch.Tensor) -> torch.Tensor:
    """eager_fake_quant_abs_max with the scale computed without gradient, as a PyTorch observer does:
    fake_quantize_per_tensor_affine cannot differentiate its scale, so the reference composition
    itself has no backward."""
    b = bin_count(BITS)
    step = torch.clamp(x.detach().abs().max().float() / b, min=1e-30)
    return torch.fake_quantize_per_tensor_affine(x, step, torch.zeros((), dtype=torch.int32, device=x.device), -b, b)


def eager_with_scale(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    b = bin_count(BITS)
    return torch.fake_quantize_per_tensor_affine(x, step, zero, -b, b)


def eager_channel_wise(w: torch.Tensor) -> torch.Tensor:
    b = bin_count(BITS)
    scales = w.abs().amax(dim=tuple(range(1, w.dim()))).float()
    step = torch.clamp(scales / b, min=1e-30)
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, step, zero, 0, -b, b)


def eager_range_abs_max_update_(x, scale, window, step, window_size):
    """range_abs_max's training step in tensor ops, with no host round trip. Simplified: the scale
    takes the window max once that exceeds the initial 0.001 (the reference latches a flag)."""
    cur = x.detach().abs().amax().float()
    idx = torch.remainder(step, window_size)
    window.index_copy_(0, idx, cur.reshape(1))
    step.add_(1)
    valid = torch.arange(window_size, device=x.device) < step
    best = torch.where(valid, window, torch.zeros_like(window)).amax()
    scale.copy_(torch.where(best > 0.001, best, scale.reshape(())).reshape(1))


def eager_moving_average_update_(x, scale, accum, state, rate=0.9):
    cur = x.detach().abs().amax().float()
    state.mul_(rate).add_(1.0)
    accum.mul_(rate).add_(cur)
    torch.div(accum, state, out=scale)


class FusedObserver:
    """torch.fused_moving_avg_obs_fake_quant with symmetric int8 per-tensor (or per-row) state."""

    def __init__(self, channels: int, device, fake_quant: bool, per_row: bool = False):
        self.on = torch.ones(1, dtype=torch.long, device=device)
        self.fq = torch.ones(1, dtype=torch.long, device=device) if fake_quant else torch.zeros(1, dtype=torch.long, device=device)
        self.rmin = torch.full((channels,), math.inf, device=device)
        self.rmax = torch.full((channels,), -math.inf, device=device)
        self.scale = torch.ones(channels, device=device)
        self.zero = torch.zeros(channels, dtype=torch.int32, device=device)
        self.per_row = per_row

    def __call__(self, x):
        b = bin_count(BITS)
        return torch.fused_moving_avg_obs_fake_quant(x, self.on, self.fq, self.rmin, self.rmax, self.scale, self.zero,
                                                     0.01, -b, b, 0, self.per_row, True)


def copy(x: torch.Tensor) -> torch.Tensor:
    return x.clone()


def fwd_bwd(op):
    """fn(x, g): forward of op (first output if a tuple), then the gradient of <out, g> wrt x."""
    def run(x, g):
        out = op(x)
        out = out[0] if isinstance(out, tuple) else out
        return torch.autograd.grad(out, x, g)
    return run


class Compiler:
    """torch.compile of the eager peers, once per shape (dynamic=False; on a GPU dynamic=True, so sizes share
    one graph per dtype), within a total time budget:
    compiling on a small CPU can take tens of seconds per graph. The first call of each compiled peer
    (where compilation happens) is charged to the budget; once it is spent, peers are skipped."""

    def __init__(self, enabled: bool, budget_s: float, dynamic: bool = False):
        self.enabled, self.budget_s, self.spent_s, self.dynamic = enabled, budget_s, 0.0, dynamic
        self._cache = {}
        if enabled:  # every (dtype, shape) of a peer is its own graph: do not fall back to eager after 8
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def peer(self, fn, wrap=None):
        """torch.compile(fn) (or wrap(torch.compile(fn)), e.g. with a backward around it) for
        common.measure_group, or a skipped Timing saying why not."""
        if not self.enabled:
            return common.skipped("--no-compile")
        if self.spent_s >= self.budget_s:
            return common.skipped("torch.compile budget of %.0f s spent" % self.budget_s)
        if fn not in self._cache:
            self._cache[fn] = torch.compile(fn, dynamic=self.dynamic)
        call = wrap(self._cache[fn]) if wrap else self._cache[fn]
        first = [True]

        def charged(*args):
            if not first[0]:
                return call(*args)
            first[0] = False
            t0 = time.perf_counter()
            try:
                return call(*args)
            finally:
                self.spent_s += time.perf_counter() - t0

        return charged


def timed_row(sec, case, fns, xs, device, quick, bytes_moved=None, copy_bytes=None):
    """Times {"ours": ..., peer: ...} interleaved and adds the row; returns the peers' timings.
    `bytes_moved` is what our op must move; the copy peer moves `copy_bytes` (one read, one write)."""
    t = common.measure_group(fns, xs, device, quick=quick)
    ours = t.pop("ours")
    sec.add_row(case, ours, t, bytes_moved=bytes_moved, peer_bytes={"copy": copy_bytes} if copy_bytes else None)
    return t


# --- sections ----------------------------------------------------------------------------------------

def per_tensor_inputs(n, device):
    return common.rotating(lambda: torch.randn(n, device=device), common.buffer_count(4 * n))


def section_forward(device, quick, compiler, inputs):
    sec = common.Section("fake_quant_abs_max_fwd", "fake_quant_abs_max forward, float32 (dynamic per-tensor scale)",
                         bandwidth_ref="copy",
                         notes=["GB/s counts the bytes each op must move: the dynamic scale needs a whole pass "
                                "over x before any element can be quantized, so ours reads x twice and writes once "
                                "(12 bytes/element, also the basis of the other peers' columns); the copy reads "
                                "and writes once (8 bytes/element)."])
    for case, n in SIZES.items():
        timed_row(sec, case, {
            "ours": lambda x: qkernels.fake_quant_abs_max(x, BITS),
            "eager": eager_fake_quant_abs_max,
            "compiled": compiler.peer(eager_fake_quant_abs_max),
            "torch fused obs+fq": FusedObserver(1, device, True),
            "copy": copy,
        }, inputs[case], device, quick, bytes_moved=12 * n, copy_bytes=8 * n)
    return sec


def section_forward_backward(device, quick, compiler, inputs):
    sec = common.Section("fake_quant_abs_max_fwd_bwd", "fake_quant_abs_max forward + backward, float32",
                         notes=["ours: ste=identity (the gradient passes unchanged). eager/compiled: the eager "
                                "composition with the scale detached (torch cannot differentiate its scale, so the "
                                "composition as written in reference.py fails, see its column), whose backward "
                                "applies the clip mask. copy: x.clone() and its identity backward."])
    sec.notes.append("ours ste=clip: the forward pass also writes the 1-bit mask, and backward reads the mask "
                     "instead of x.")
    for case, n in SIZES.items():
        xs = [(x.detach().requires_grad_(), torch.randn_like(x)) for x in inputs[case]]
        t = common.measure_group({
            "ours": fwd_bwd(lambda x: qkernels.fake_quant_abs_max(x, BITS)),
            "ours ste=clip": fwd_bwd(lambda x: qkernels.fake_quant_abs_max(x, BITS, ste="clip")),
            "eager": fwd_bwd(eager_fake_quant_detached_scale),
            "eager (reference.py as is)": fwd_bwd(eager_fake_quant_abs_max),
            "compiled": compiler.peer(eager_fake_quant_detached_scale, wrap=fwd_bwd),
            "torch fused obs+fq": fwd_bwd(FusedObserver(1, device, True)),
            "copy": fwd_bwd(copy),
        }, xs, device, quick=quick)
        ours, clip = t.pop("ours"), t.pop("ours ste=clip")
        sec.add_row(case, ours, t)
        sec.add_row(case + ", ours ste=clip", clip, {"eager": t["eager"], "copy": t["copy"]})
    return sec


def section_with_scale(device, quick, compiler, inputs):
    sec = common.Section("fake_quant_with_scale", "fake_quant_with_scale forward, float32 (given scale)",
                         bandwidth_ref="copy",
                         notes=["eager: torch.fake_quantize_per_tensor_affine with a precomputed step tensor."])
    b = bin_count(BITS)
    for case, n in SIZES.items():
        scale = inputs[case][0].abs().max().float()
        step, zero = scale / b, torch.zeros((), dtype=torch.int32, device=device)
        xs = [(x, step, zero) for x in inputs[case]]
        timed_row(sec, case, {
            "ours": lambda x, s, z: qkernels.fake_quant_with_scale(x, scale, BITS),
            "eager": eager_with_scale,
            "compiled": compiler.peer(eager_with_scale),
            "copy": lambda x, s, z: x.clone(),
        }, xs, device, quick, bytes_moved=8 * n)
    return sec


def section_channel_wise(device, quick, compiler):
    sec = common.Section("fake_channel_wise_quant_abs_max", "fake_channel_wise_quant_abs_max forward (conv weights, "
                         "axis 0), float32", bandwidth_ref="copy",
                         notes=["eager: amax over the non-channel dims + torch.fake_quantize_per_channel_affine. "
                                "torch fused obs+fq: per-row observer + fake quant. GB/s: 12 bytes/element for "
                                "ours (the per-channel scales need a pass over w first), 8 for the copy."])
    for case, shape in CONV_WEIGHTS.items():
        n = math.prod(shape)
        ws = common.rotating(lambda: torch.randn(shape, device=device), common.buffer_count(4 * n))
        timed_row(sec, case, {
            "ours": lambda w: qkernels.fake_channel_wise_quant_abs_max(w, BITS, 0),
            "eager": eager_channel_wise,
            "compiled": compiler.peer(eager_channel_wise),
            "torch fused obs+fq": FusedObserver(shape[0], device, True, per_row=True),
            "copy": copy,
        }, ws, device, quick, bytes_moved=12 * n, copy_bytes=8 * n)
    return sec


def section_state_updates(device, quick, compiler, inputs):
    sec = common.Section("quantizer_state_updates", "Quantizer state updates (training step), float32 input",
                         bandwidth_ref="amax",
                         notes=["Each op reads x once (4 bytes/element, the GB/s basis) and updates a few state "
                                "values in place, without a host round trip. amax: torch.amax(x), a plain read-only "
                                "reduction (the floor). torch fused obs: fused_moving_avg_obs_fake_quant with "
                                "fake quant off (its min/max observer update only). The last rows time a whole QAT "
                                "activation step: moving_average update + fake_quant_with_scale vs the fused op with "
                                "fake quant on."])
    for case, n in SIZES.items():
        xs = inputs[case]
        scale, window = torch.full((1,), 0.001, device=device), torch.zeros(WINDOW_SIZE, device=device)
        step = torch.zeros(1, dtype=torch.long, device=device)
        e_scale, e_window = torch.full((1,), 0.001, device=device), torch.zeros(WINDOW_SIZE, device=device)
        e_step = torch.zeros(1, dtype=torch.long, device=device)
        timed_row(sec, "range_abs_max " + case, {
            "ours": lambda x: qkernels.range_abs_max_update_(x, scale, window, step, WINDOW_SIZE),
            "eager": lambda x: eager_range_abs_max_update_(x, e_scale, e_window, e_step, WINDOW_SIZE),
            "amax": torch.amax,
        }, xs, device, quick, bytes_moved=4 * n)

        def ma_state():
            return (torch.full((1,), 0.001, device=device), torch.ones(1, device=device), torch.ones(1, device=device))

        o_s, o_a, o_st = ma_state()
        e_s, e_a, e_st = ma_state()
        timed_row(sec, "moving_average_abs_max " + case, {
            "ours": lambda x: qkernels.moving_average_abs_max_update_(x, o_s, o_a, o_st, 0.9),
            "eager": lambda x: eager_moving_average_update_(x, e_s, e_a, e_st),
            "torch fused obs": FusedObserver(1, device, False),
            "amax": torch.amax,
        }, xs, device, quick, bytes_moved=4 * n)

        q_s, q_a, q_st = ma_state()

        def ours_step(x):
            qkernels.moving_average_abs_max_update_(x, q_s, q_a, q_st, 0.9)
            return qkernels.fake_quant_with_scale(x, q_s, BITS)

        timed_row(sec, "QAT step (moving avg + fake quant) " + case, {
            "ours": ours_step, "torch fused obs+fq": FusedObserver(1, device, True), "copy": copy,
        }, xs, device, quick)
    return sec


# --- GPU sections: every dtype, up to 256M elements, as TB/s and % of the HBM limit ----------------------

def hbm_limit_gbps(device):
    """(GB/s, how it was found): 2 x memory clock x bus width, else the nominal figure of the model."""
    if device.type != "cuda":
        return None, "not a GPU"
    props = torch.cuda.get_device_properties(device)
    clock_khz, bus_bits = getattr(props, "memory_clock_rate", 0), getattr(props, "memory_bus_width", 0)
    if clock_khz and bus_bits:
        return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9, "2 x memory clock %d MHz x %d-bit bus" % (clock_khz // 1000,
                                                                                                  bus_bits)
    for key, gbps in NOMINAL_HBM_GBPS:
        if key in props.name:
            return float(gbps), "nominal figure of the %s" % key
    return None, "unknown for %s" % props.name


class BandwidthSection(common.Section):
    """A timing table whose notes (and JSON) add TB/s and % of the HBM limit for every column."""

    limit_gbps = None
    limit_how = ""

    def to_dict(self):
        d = super().to_dict()
        d["hbm_limit_gbps"], d["hbm_limit_how"] = self.limit_gbps, self.limit_how
        peers = self.peer_names()
        lines = ["HBM limit %s GB/s (%s). TB/s of the bytes each column's op must move (the copy: one read "
                 "and one write)%s:" % ("%.0f" % self.limit_gbps if self.limit_gbps else "unknown", self.limit_how,
                                        "; in brackets % of the HBM limit" if self.limit_gbps else ""), "",
                 "| case | ours | " + " | ".join(peers) + " |", "|" + "---|" * (2 + len(peers))]
        for row in d["rows"]:
            bw = row.get("gbps") or {}

            def cell(name):
                v = bw.get(name)
                if not v:
                    return "-"
                return "%.2f (%.0f%%)" % (v / 1e3, 100 * v / self.limit_gbps) if self.limit_gbps else "%.2f" % (v / 1e3)

            lines.append("| %s | %s | %s |" % (row["case"], cell("ours"), " | ".join(cell(p) for p in peers)))
            row["pct_of_hbm_limit"] = ({n: 100 * v / self.limit_gbps for n, v in bw.items() if v}
                                       if self.limit_gbps else None)
        d["notes"] = list(self.notes) + [""] + lines
        return d


def gpu_inputs(n, dtype, device, shape=None):
    shape = shape or (n,)
    return common.rotating(lambda: torch.randn(shape, device=device).to(dtype),
                           common.buffer_count(n * torch.finfo(dtype).bits // 8))


def section_gpu(kind, device, quick, compiler, limit, sizes=GPU_SIZES):
    """kind: "dynamic" (fake_quant_abs_max), "with_scale" or "channel_wise"."""
    titles = {"dynamic": "fake_quant_abs_max forward (dynamic per-tensor scale)",
              "with_scale": "fake_quant_with_scale forward (given scale)",
              "channel_wise": "fake_channel_wise_quant_abs_max forward ([n/%d, %d], axis 0)" % (GPU_ROW, GPU_ROW)}
    sec = BandwidthSection("gpu_" + kind, titles[kind] + ", every dtype", bandwidth_ref="copy")
    sec.limit_gbps, sec.limit_how = limit
    passes = 2 if kind == "with_scale" else 3  # reads + writes of x's size each op must make
    sec.notes.append("Bytes the op must move: %d x the tensor (%s); the copy: 2 x." % (
        passes, "read and write" if passes == 2 else "the scale needs a whole pass before any element can be "
        "quantized: read twice, write once"))
    zero = torch.zeros((), dtype=torch.int32, device=device)
    b = bin_count(BITS)
    for dname, dtype in GPU_DTYPES.items():
        for case, n in sizes.items():
            width = torch.finfo(dtype).bits // 8
            if kind == "channel_wise":
                xs = gpu_inputs(n, dtype, device, (n // GPU_ROW, GPU_ROW))
                fns = {"ours": lambda w: qkernels.fake_channel_wise_quant_abs_max(w, BITS, 0),
                       "eager": eager_channel_wise, "compiled": compiler.peer(eager_channel_wise),
                       "torch fused obs+fq": FusedObserver(n // GPU_ROW, device, True, per_row=True)}
            elif kind == "dynamic":
                xs = gpu_inputs(n, dtype, device)
                fns = {"ours": lambda x: qkernels.fake_quant_abs_max(x, BITS), "eager": eager_fake_quant_abs_max,
                       "compiled": compiler.peer(eager_fake_quant_abs_max),
                       "torch fused obs+fq": FusedObserver(1, device, True)}
            else:
                xs = gpu_inputs(n, dtype, device)
                scale = xs[0].float().abs().max()
                step = scale / b
                xs = [(x, step, zero) for x in xs]
                fns = {"ours": lambda x, s_, z: qkernels.fake_quant_with_scale(x, scale, BITS),
                       "eager": eager_with_scale, "compiled": compiler.peer(eager_with_scale)}
            fns["copy"] = (lambda x, *rest: x.clone())
            timed_row(sec, "%s %s" % (dname, case), fns, xs, device, quick, bytes_moved=passes * width * n,
                      copy_bytes=2 * width * n)
            del xs
            if device.type == "cuda":
                torch.cuda.empty_cache()
    judge_gpu(sec, limit[0], sizes)
    return sec


def section_gpu_backward(device, quick, compiler, sizes=GPU_SIZES):
    sec = common.Section("gpu_fwd_bwd_clip", "fake_quant_with_scale forward + backward with ste=clip, %s elements"
                         % list(sizes)[1],
                         notes=["ours: the forward also writes the 1-bit mask, backward reads it (2 bytes/element "
                                "less than reading x back in float32). eager: "
                                "torch.fake_quantize_per_tensor_affine, whose backward applies its own saved mask."])
    b = bin_count(BITS)
    n = list(sizes.values())[1]  # 16M on a GPU
    for dname, dtype in GPU_DTYPES.items():
        xs = [(x.requires_grad_(), torch.randn_like(x)) for x in gpu_inputs(n, dtype, device)]
        scale = xs[0][0].detach().float().abs().max() * 0.5
        step, zero = scale / b, torch.zeros((), dtype=torch.int32, device=device)
        t = common.measure_group({
            "ours": fwd_bwd(lambda x: qkernels.fake_quant_with_scale(x, scale, BITS, ste="clip")),
            "eager": fwd_bwd(lambda x: eager_with_scale(x, step, zero)),
            "copy": fwd_bwd(copy),
        }, xs, device, quick=quick)
        ours = t.pop("ours")
        sec.add_row(dname, ours, t)
        del xs
    return sec


def judge_gpu(sec, limit_gbps, sizes):
    for row in sec.rows:
        dname, case = row["case"].split()
        if case == next(iter(sizes)):  # the targets are for 16M elements and more
            continue
        ours_bw = common.gbps(row["bytes_moved"], row["ours"])
        if limit_gbps:
            frac = None if ours_bw is None else ours_bw / limit_gbps
            sec.add_target("%s: >= %.0f%% of the HBM limit" % (row["case"], 100 * HBM_LIMIT),
                           None if frac is None else frac >= HBM_LIMIT,
                           "" if frac is None else "%.0f%% (%.2f TB/s)" % (100 * frac, ours_bw / 1e3))
        fused = row["ratios"].get("torch fused obs+fq")
        if "torch fused obs+fq" in row["peers"]:
            sec.add_target("%s: >= %.0fx faster than torch's fused observer + fake quant" % (row["case"], FUSED_SPEEDUP),
                           None if fused is None else fused >= FUSED_SPEEDUP,
                           "a timing failed" if fused is None else "%.2fx" % fused)


# --- targets -----------------------------------------------------------------------------------------

def judge_targets(sec: common.Section) -> None:
    """The CPU targets (the GPU sections judge their own)."""
    rows = {row["case"]: row for row in sec.rows}

    def rat(case, peer):
        return rows[case]["ratios"].get(peer) if case in rows else None

    def check(text, value, bound, describe):
        met = None if value is None else value >= bound
        sec.add_target(text, met, describe(value) if value is not None else "a timing failed")

    check("16M: >= 3x faster than eager", rat("16M", "eager"), 3.0, lambda v: "eager/ours = %.2fx" % v)
    check("16M: within 2x of the copy's time", rat("16M", "copy"), 0.5,
          lambda v: "ours = %.2fx the copy's time" % (1 / v))
    check("1M: >= 5x faster than eager", rat("1M", "eager"), 5.0, lambda v: "eager/ours = %.2fx" % v)


def main():
    parser = common.arg_parser(__doc__)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    parser.add_argument("--compile-budget", type=float, default=None,
                        help="seconds of torch.compile warm-up allowed in total (default 90, 45 with --quick)")
    parser.add_argument("--gpu-tables", action="store_true",
                        help="the GPU's tables (every dtype, TB/s) on --device cpu, at 1/64 of the GPU sizes: "
                             "tries the script's GPU path without a GPU (the figures mean nothing)")
    args = parser.parse_args()
    device, env = common.setup(args)
    budget = args.compile_budget if args.compile_budget is not None else (45.0 if args.quick else 90.0)
    compiler = Compiler(not args.no_compile, budget, dynamic=device.type == "cuda")
    if device.type == "cuda" or args.gpu_tables:
        limit = hbm_limit_gbps(device)
        sizes = GPU_SIZES if device.type == "cuda" else {"%dK" % (v // 64 >> 10): v // 64 for v in GPU_SIZES.values()}
        sections = [section_gpu(kind, device, args.quick, compiler, limit, sizes)
                    for kind in ("dynamic", "with_scale", "channel_wise")]
        sections.append(section_gpu_backward(device, args.quick, compiler, sizes))
        first = sections[0]
    else:
        inputs = {case: per_tensor_inputs(n, device) for case, n in SIZES.items()}
        first = section_forward(device, args.quick, compiler, inputs)
        judge_targets(first)
        sections = [first]
        for build in (section_forward_backward, section_with_scale):
            sections.append(build(device, args.quick, compiler, inputs))
        sections.append(section_channel_wise(device, args.quick, compiler))
        sections.append(section_state_updates(device, args.quick, compiler, inputs))
    if compiler.enabled:
        first.notes.append("torch.compile warm-up spent: %.1f s of a %.0f s budget." % (compiler.spent_s, budget))
    common.publish(SCRIPT, sections, args, device, env)


if __name__ == "__main__":
    main()
