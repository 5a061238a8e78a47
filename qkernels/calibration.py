"""Post-training calibration: static activation scales from data, without training.

``calibrate(model, batches, method)`` runs a transpiled model over an iterable of inputs in eval mode with
every fake quant switched off: the statistics are those of the float activations, the batch norms use
and keep their running statistics, and nothing trains. Each static activation quantizer
(``range_abs_max`` / ``moving_average_abs_max``) then gets its scale from one calibrator:

- ``abs_max``: the max of ``|x|`` over every batch, the reference's statistic (what range_abs_max records
  over a window longer than the data).
- ``percentile``: the ``percentile``-th percentile of ``|x|`` over every value seen (99.99 by default),
  from a 2048-bin histogram that widens as larger values arrive: outliers no longer set the scale.
- ``mse``: the scale that minimises the expected squared quantization error of that histogram (clipping
  error above the scale, ``step**2 / 12`` rounding error below), searched over 128 candidates up to the max.

A quantizer read by several layers (one state) is calibrated once, on the tensor they share. Dynamic
``abs_max`` quantizers have no state to calibrate and are left alone. freeze_program / convert_to_int8
can follow directly.
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np
import torch
from torch import nn

from .nn.quantizers import ActivationQuantizer, FakeQuantMovingAverageAbsMax, FakeQuantRangeAbsMax, _Quantizer

METHODS = ("abs_max", "percentile", "mse")
_BINS = 2048
_MSE_CANDIDATES = 128


class _Histogram:
    """Counts of |x| over [0, top] in fixed bins; ``top`` grows to the largest value seen (old counts are
    moved into the wider bins by their centres)."""

    def __init__(self, bins: int = _BINS):
        self.bins = bins
        self.top = 0.0
        self.counts = np.zeros(bins, dtype=np.float64)

    def add(self, a: torch.Tensor) -> None:
        a = a.detach().float().abs().flatten()
        a = a[torch.isfinite(a)]
        if a.numel() == 0:
            return
        top = float(a.max())
        if top > self.top:
            if self.top > 0 and self.counts.any():
                centres = (np.arange(self.bins) + 0.5) * (self.top / self.bins)
                self.counts = np.histogram(centres, bins=self.bins, range=(0.0, top), weights=self.counts)[0]
            self.top = top
        if self.top == 0.0:
            self.counts[0] += a.numel()
            return
        counts = torch.histc(a, bins=self.bins, min=0.0, max=self.top)
        self.counts += counts.double().cpu().numpy()

    def percentile(self, p: float) -> float:
        total = self.counts.sum()
        if total == 0 or self.top == 0:
            return 0.0
        cumulative = np.cumsum(self.counts) / total
        index = int(np.searchsorted(cumulative, p / 100.0))
        return float(min(index + 1, self.bins) * self.top / self.bins)

    def mse_scale(self, bits: int) -> float:
        if self.counts.sum() == 0 or self.top == 0:
            return 0.0
        bin_ = 2 ** (bits - 1) - 1
        centres = (np.arange(self.bins) + 0.5) * (self.top / self.bins)
        best, best_err = self.top, np.inf
        for s in np.linspace(self.top / _MSE_CANDIDATES, self.top, _MSE_CANDIDATES):
            step = s / bin_
            clipped = centres > s
            err = np.sum(self.counts[clipped] * (centres[clipped] - s) ** 2)
            err += np.sum(self.counts[~clipped]) * step * step / 12.0
            if err < best_err:
                best, best_err = float(s), err
        return best


class _Observer:
    def __init__(self, method: str):
        self.method = method
        self.abs_max = 0.0
        self.batches = 0
        self.hist = _Histogram() if method in ("percentile", "mse") else None

    def __call__(self, _module, args) -> None:
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            return
        finite = x.detach().float().abs()
        finite = torch.where(torch.isfinite(finite), finite, torch.zeros((), device=finite.device))
        self.abs_max = max(self.abs_max, float(finite.max()))
        self.batches += 1
        if self.hist is not None:
            self.hist.add(x)

    def scale(self, bits: int, percentile: float) -> float:
        if self.method == "abs_max":
            return self.abs_max
        if self.method == "percentile":
            return min(self.hist.percentile(percentile), self.abs_max)
        return self.hist.mse_scale(bits)


@dataclass
class CalibrationResult:
    method: str
    batches: int
    scales: Dict[str, float] = field(default_factory=dict)      # quantizer path -> scale set
    abs_max: Dict[str, float] = field(default_factory=dict)     # quantizer path -> max |x| seen
    skipped: List[str] = field(default_factory=list)            # dynamic quantizers (no state) left alone

    def __str__(self) -> str:
        lines = ["calibration (%s) over %d batches: %d static scales set, %d dynamic quantizers left alone"
                 % (self.method, self.batches, len(self.scales), len(self.skipped))]
        for name, s in self.scales.items():
            lines.append("  %s: scale %.6g (max |x| %.6g)" % (name, s, self.abs_max[name]))
        return "\n".join(lines)


def _set_scale(q: ActivationQuantizer, scale: float) -> None:
    """Put the quantizer's whole state where training with a constant batch max ``scale`` would leave it."""
    with torch.no_grad():
        q.scale.fill_(scale)
        if isinstance(q, FakeQuantRangeAbsMax):
            q.window.zero_()
            q.window[0] = scale
            q.step.fill_(1)
        elif isinstance(q, FakeQuantMovingAverageAbsMax):
            q.accum.fill_(scale)
            q.state.fill_(1.0)


def _call(model: nn.Module, forward: Optional[Callable], batch) -> None:
    if forward is not None:
        forward(model, batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    elif isinstance(batch, dict):
        model(**batch)
    else:
        model(batch)


def calibrate(model: nn.Module, batches: Iterable, method: str = "abs_max", percentile: float = 99.99,
              forward: Optional[Callable] = None) -> CalibrationResult:
    """Set every static activation scale of a transpiled ``model`` from ``batches`` (tensors, tuples of
    forward's arguments, or anything ``forward(model, batch)`` accepts). The model's modes, its batch-norm
    statistics and its quantizers' on/off switches are as before afterwards."""
    if method not in METHODS:
        raise ValueError("qkernels: calibration method must be one of %s, got %r" % (METHODS, method))
    if not 0.0 < float(percentile) <= 100.0:
        raise ValueError("qkernels: percentile must be in (0, 100], got %r" % (percentile,))
    names = {}
    for name, m in model.named_modules():
        if isinstance(m, ActivationQuantizer):
            names.setdefault(id(m), (name, m))
    if not names:
        raise RuntimeError("qkernels: the model has no activation quantizers: call training_transpile(model) "
                           "before calibrate")
    static = {k: v for k, v in names.items() if v[1].static}
    result = CalibrationResult(method, 0, skipped=[n for n, q in names.values() if not q.static])
    if not static:
        raise RuntimeError("qkernels: every activation quantizer is dynamic (abs_max): calibration sets static "
                           "scales; transpile with activation_quantize_type='range_abs_max' or "
                           "'moving_average_abs_max'")
    modes = {id(m): m.training for m in model.modules()}
    switches = {id(m): m.enabled for m in model.modules() if isinstance(m, _Quantizer)}
    observers, hooks = {}, []
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, _Quantizer):
                m.enabled = False
        for key, (_name, q) in static.items():
            observers[key] = _Observer(method)
            hooks.append(q.register_forward_pre_hook(observers[key]))
        with torch.no_grad():
            for batch in batches:
                _call(model, forward, batch)
                result.batches += 1
    finally:
        for h in hooks:
            h.remove()
        for m in model.modules():
            m.training = modes.get(id(m), m.training)
            if isinstance(m, _Quantizer):
                m.enabled = switches.get(id(m), m.enabled)
    if result.batches == 0:
        raise ValueError("qkernels: calibrate got no batches")
    for key, (name, q) in static.items():
        obs = observers[key]
        if obs.batches == 0:
            continue  # never called by forward: keep the initial scale
        scale = obs.scale(q.bits, percentile)
        _set_scale(q, scale)
        result.scales[name] = scale
        result.abs_max[name] = obs.abs_max
    return result
