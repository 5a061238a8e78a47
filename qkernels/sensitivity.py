"""Sensitivity analysis: which layers cost the most when quantized.

``sensitivity(model, transpiler, evaluate, batches)`` quantizes one layer (or one group of layers) at a
time, everything else float, calibrates it on ``batches`` (post-training, qkernels/calibration.py) and
measures ``evaluate(model)`` (higher is better: accuracy, mAP, negative loss...). Each row is the metric
drop against the float model; the worst rows are the layers to keep float, and ``skip_pattern(k)`` is the
``QuantizeTranspiler(skip_pattern=...)`` that keeps the worst ``k`` groups float. The report also holds
the metric of the fully quantized model and of that model with the worst group kept float.

The model given is never changed (each trial works on a copy).
"""
import copy
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from torch import nn

from .calibration import METHODS


@dataclass
class SensitivityRow:
    group: str
    layers: List[str]
    metric: float
    drop: float          # float metric - metric with only this group quantized


@dataclass
class SensitivityReport:
    float_metric: float
    quantized_metric: float                     # every layer quantized
    rows: List[SensitivityRow] = field(default_factory=list)   # worst first
    worst_kept_float_metric: Optional[float] = None            # every layer but the worst group quantized
    calibration: str = "abs_max"

    def skip_pattern(self, k: int = 1) -> List["re.Pattern"]:
        """``QuantizeTranspiler(skip_pattern=report.skip_pattern(k))`` keeps the layers of the ``k`` worst groups
        float: one anchored regex per layer path (a plain substring 'body.1' would also match 'body.10')."""
        names: List[str] = []
        for row in self.rows[:k]:
            names.extend(n for n in row.layers if n not in names)
        return [re.compile("^%s$" % re.escape(n)) for n in names]

    def __str__(self) -> str:
        lines = ["sensitivity (%s calibration): float %.4f, all quantized %.4f (drop %.4f)"
                 % (self.calibration, self.float_metric, self.quantized_metric,
                    self.float_metric - self.quantized_metric)]
        lines.append("  %-36s %10s %10s" % ("quantized alone", "metric", "drop"))
        for row in self.rows:
            lines.append("  %-36s %10.4f %10.4f" % (row.group, row.metric, row.drop))
        if self.rows and self.worst_kept_float_metric is not None:
            lines.append("  all quantized but %s (skip_pattern=%s): %.4f"
                         % (self.rows[0].group, [p.pattern for p in self.skip_pattern(1)], self.worst_kept_float_metric))
        return "\n".join(lines)


def _exact(names: Sequence[str]) -> Callable[[str, nn.Module], bool]:
    wanted = set(names)

    def keep_float(name: str, _module: nn.Module) -> bool:
        return name not in wanted

    return keep_float


def _trial(model: nn.Module, transpiler, batches, method: str, evaluate: Callable, skip) -> float:
    t = copy.copy(transpiler)
    t.skip_pattern = list(transpiler.skip_pattern) + ([skip] if skip is not None else [])
    trial = copy.deepcopy(model)
    trial = t.training_transpile(trial, example_inputs=transpiler._example_inputs)
    if t.activation_quantize_type != "abs_max":
        t.calibrate(trial, batches, method=method)
    trial.eval()
    return float(evaluate(trial))


def sensitivity(model: nn.Module, transpiler, evaluate: Callable[[nn.Module], float], batches: Iterable,
                groups: Optional[Dict[str, Sequence[str]]] = None, method: str = "abs_max") -> SensitivityReport:
    """One trial per layer (or per entry of ``groups``: name -> layer paths) of the float ``model``;
    ``transpiler`` (a QuantizeTranspiler) gives the settings, ``batches`` the calibration data (a
    re-iterable such as a list; used for every trial), ``evaluate(model) -> float`` the metric."""
    if method not in METHODS:
        raise ValueError("qkernels: calibration method must be one of %s, got %r" % (METHODS, method))
    batches = list(batches)
    if not batches:
        raise ValueError("qkernels: sensitivity needs calibration batches")
    probe = copy.copy(transpiler)
    probe.training_transpile(copy.deepcopy(model), example_inputs=transpiler._example_inputs)
    layers = [name for name, _old, _new in probe.summary.swapped]
    if groups is None:
        groups = {name: [name] for name in layers}
    unknown = sorted({n for g in groups.values() for n in g} - set(layers))
    if unknown:
        raise ValueError("qkernels: sensitivity groups name layers the transpiler does not quantize: %s"
                         % ", ".join(unknown))
    float_model = copy.deepcopy(model).eval()
    float_metric = float(evaluate(float_model))
    quantized = _trial(model, transpiler, batches, method, evaluate, None)
    rows = []
    for group, names in groups.items():
        metric = _trial(model, transpiler, batches, method, evaluate, _exact(list(names)))
        rows.append(SensitivityRow(group, list(names), metric, float_metric - metric))
    rows.sort(key=lambda r: r.drop, reverse=True)
    report = SensitivityReport(float_metric, quantized, rows, calibration=method)
    if rows:
        worst = set(rows[0].layers)
        report.worst_kept_float_metric = _trial(model, transpiler, batches, method, evaluate,
                                                lambda name, _m: name in worst)
    return report
