"""TranspileSummary: what one transpiler pass found and did to a model, printable (``print(t.summary)``).

Each pass (training_transpile, freeze_program, convert_to_int8) leaves one in ``QuantizeTranspiler.summary``.
Names are module paths in the model; lists keep the model's call order.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple


@dataclass
class TranspileSummary:
    stage: str                    # 'training_transpile', 'calibrate', 'freeze_program' or 'convert_to_int8'
    model: str                    # the model's class name
    graph: str                    # how the structure was found: 'torch.fx', 'torch.export', 'nn.Sequential (fallback)'
    trace_failure: Optional[str] = None   # why tracing failed, when the fallback was used
    returned: str = "the same model, changed in place (module swaps)"
    swapped: List[Tuple[str, str, str]] = field(default_factory=list)     # (path, old type, new type)
    folded: List[Tuple[str, str]] = field(default_factory=list)           # (layer, batch norm)
    fused: List[Tuple[str, str, str]] = field(default_factory=list)       # (layer, activation, where it was)
    chained: List[Tuple[str, Tuple[str, ...]]] = field(default_factory=list)  # (producer, layers reading its codes)
    fused_adds: List[Tuple[str, str]] = field(default_factory=list)       # (float add, the ReLU it now applies)
    shared_inputs: List[Tuple[str, ...]] = field(default_factory=list)    # layers reading one tensor; first owns the quantizer
    not_folded: List[Tuple[str, str]] = field(default_factory=list)       # (batch norm, why)
    not_fused: List[Tuple[str, str]] = field(default_factory=list)        # (activation, why)
    not_chained: List[Tuple[str, str]] = field(default_factory=list)      # (layer, why)
    abs_max_handed: List[str] = field(default_factory=list)               # dynamic: layers handing readers their abs max
    float_ops: Dict[str, int] = field(default_factory=dict)               # batch norms / activations still run in float
    skipped: List[Tuple[str, str]] = field(default_factory=list)          # (layer kept float, why: skip_pattern, type)
    calibrated: List[Tuple[str, float, float]] = field(default_factory=list)  # (quantizer, scale set, max |x| seen)
    calibration: Optional[str] = None     # calibrate(): the method and the number of batches

    @property
    def counts(self) -> Dict[str, int]:
        return {"swapped": len(self.swapped), "folded": len(self.folded), "fused": len(self.fused),
                "chained": len(self.chained), "fused_adds": len(self.fused_adds),
                "shared_inputs": len(self.shared_inputs),
                "not_folded": len(self.not_folded), "not_fused": len(self.not_fused),
                "not_chained": len(self.not_chained), "skipped": len(self.skipped),
                "calibrated": len(self.calibrated), "abs_max_handed": len(self.abs_max_handed)}

    def to_dict(self) -> Dict:
        return {"stage": self.stage, "model": self.model, "graph": self.graph, "trace_failure": self.trace_failure,
                "returned": self.returned, "counts": self.counts, "swapped": self.swapped, "folded": self.folded,
                "fused": self.fused, "chained": [(p, list(c)) for p, c in self.chained], "fused_adds": self.fused_adds,
                "shared_inputs": [list(g) for g in self.shared_inputs], "not_folded": self.not_folded,
                "not_fused": self.not_fused, "not_chained": self.not_chained, "float_ops": self.float_ops,
                "skipped": self.skipped, "calibrated": self.calibrated, "calibration": self.calibration,
                "abs_max_handed": self.abs_max_handed}

    def __str__(self) -> str:
        c = self.counts
        lines = ["%s of %s (graph: %s)" % (self.stage, self.model, self.graph)]
        if self.trace_failure:
            lines.append("  not traced: %s" % self.trace_failure)
        lines.append("  returned: %s" % self.returned)
        if self.calibration:
            lines.append("  calibrated: %s, %d static scales set" % (self.calibration, c["calibrated"]))
            for name, scale, seen in self.calibrated:
                lines.append("    %s: scale %.6g (max |x| seen %.6g)" % (name, scale, seen))
        lines.append("  %d layers swapped, %d batch norms folded, %d activations fused, %d layers chained in "
                     "int8, %d shared inputs (one quantizer each)" % (c["swapped"], c["folded"], c["fused"],
                                                                   c["chained"], c["shared_inputs"]))
        if self.abs_max_handed:
            lines.append("  %d layers hand their dynamic readers the abs max of their output (taken as they write "
                         "it)" % c["abs_max_handed"])
        if self.skipped:
            lines.append("  %d layers kept in float" % c["skipped"])
        if self.fused_adds:
            lines.append("  %d ReLUs after a float add fused into it (add_relu)" % c["fused_adds"])
        if self.float_ops:
            lines.append("  still in float: " + ", ".join("%d %s" % (n, k) for k, n in sorted(self.float_ops.items())))
        for title, rows in (("kept float", self.skipped), ("not folded", self.not_folded),
                            ("not fused", self.not_fused), ("not chained", self.not_chained)):
            for name, why in rows:
                lines.append("  %s: %s: %s" % (title, name, why))
        for group in self.shared_inputs:
            lines.append("  one input quantizer for: %s" % ", ".join(group))
        return "\n".join(lines)
