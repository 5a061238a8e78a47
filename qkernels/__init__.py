"""qkernels: quantization-aware training and real int8 inference kernels for PyTorch."""
from ._version import __version__  # noqa: F401
from ._library import has_cuda_kernels  # noqa: F401  (loads the compiled operators first)
from .build_report import build_info  # noqa: F401
from .ops import *  # noqa: F401,F403
from . import nn  # noqa: F401  (quantizer modules and quantized layers)
from .graph import TranspileSummary  # noqa: F401
from .transpiler import GraphTraceWarning, QuantizeTranspiler  # noqa: F401
