"""qkernels: quantization-aware training and real int8 inference kernels for PyTorch."""
from ._version import __version__  # noqa: F401
from ._library import has_cuda_kernels  # noqa: F401  (loads the compiled operators first)
from .build_report import build_info  # noqa: F401
from .ops import *  # noqa: F401,F403
from . import nn  # noqa: F401  (quantizer modules and quantized layers)
from .graph import TranspileSummary  # noqa: F401
from .transpiler import GraphTraceWarning, QuantizeTranspiler  # noqa: F401
from .calibration import calibrate  # noqa: F401  (post-training calibration; also QuantizeTranspiler.calibrate)
from .export import export_onnx, onnxruntime_session, run_onnx  # noqa: F401  (onnx / onnxscript imported on use)
from .nn.quantizers import FloatCheckpointWarning  # noqa: F401
from .ops.onnx import onnx_translations  # noqa: F401
from .parity import parity_report  # noqa: F401
from .sensitivity import sensitivity  # noqa: F401
