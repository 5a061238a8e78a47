"""MobileNet-v1-SSD 300x300 detector on PascalVOC: model, priors, loss, detection output, mAP.

Pure PyTorch; quantization comes from qkernels' transpiler applied to the model's Conv2d layers.
"""
from .loss import MultiBoxLoss
from .metrics import DetectionMAP
from .model import MobileNetSSD
from .postprocess import DetectionOutput, detection_output
from .priors import VARIANCES, prior_boxes

__all__ = ["MobileNetSSD", "prior_boxes", "VARIANCES", "MultiBoxLoss", "detection_output", "DetectionOutput",
           "DetectionMAP"]
