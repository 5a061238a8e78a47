"""What this qkernels was built with and what of it runs here: ``build_info()`` (a dict, for tests and
benchmark records) and ``format_build_report()`` (the text ``python -m qkernels`` prints)."""
import os
import platform
import re
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import _library
from ._version import __version__


def arch_runs_on(arch: str, capability: Tuple[int, int]) -> bool:
    """Whether code compiled for `arch` runs on a device of compute capability (major, minor).

    sm_XY machine code runs on capability X.Y' for Y' >= Y of the same major; sm_XYa (architecture-specific
    features) only on X.Y itself; compute_XY (PTX) is compiled by the driver for any capability >= X.Y.
    """
    m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", arch)
    if not m:
        return False
    kind, major, minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
    if kind == "compute":
        return not suffix and capability >= (major, minor)
    if suffix:
        return capability == (major, minor) if suffix == "a" else (capability[0] == major and capability[1] >= minor)
    return capability[0] == major and capability[1] >= minor


def _cuda_devices(archs: List[str]) -> List[Dict[str, Any]]:
    if not torch.cuda.is_available():
        return []
    devices = []
    for i in range(torch.cuda.device_count()):
        cap = torch.cuda.get_device_capability(i)
        devices.append({"index": i, "name": torch.cuda.get_device_name(i), "capability": "%d.%d" % cap,
                        "runs": any(arch_runs_on(a, cap) for a in archs)})
    return devices


def _cuda_verdict(has_kernels: bool, record: dict, devices: List[Dict[str, Any]]) -> Tuple[bool, str]:
    if not has_kernels:
        return False, "built without CUDA kernels (%s)" % record.get("cuda_reason", "reason not recorded")
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    running = [d for d in devices if d["runs"]]
    if not running:
        return False, "no device here matches the compiled architectures (%s)" % ", ".join(
            "%s is %s" % (d["name"], d["capability"]) for d in devices)
    return True, "on " + ", ".join("cuda:%d %s (%s)" % (d["index"], d["name"], d["capability"]) for d in running)


def build_info() -> Dict[str, Any]:
    """The build report as a flat dict of plain values (JSON-ready)."""
    compiled = _library._C.build_info()
    record = _library.read_build_record()
    has_kernels = _library.has_cuda_kernels()
    archs = list(record.get("cuda_archs", []))
    devices = _cuda_devices(archs) if has_kernels else []
    can_run, why = _cuda_verdict(has_kernels, record, devices)
    try:
        selected: Optional[str] = _library._C.int8_isa_selected()
        isa_error = None
    except ValueError as exc:
        selected, isa_error = None, str(exc)
    return {
        "qkernels_version": __version__,
        "qkernels_version_built": record.get("qkernels_version"),
        "extension": _library._C.__file__,
        "torch_built": record.get("torch_version", compiled["torch_headers"]),
        "torch_built_cuda": record.get("torch_cuda_version"),
        "torch_headers": compiled["torch_headers"],
        "torch_running": torch.__version__,
        "torch_running_cuda": torch.version.cuda,
        "torch_mismatch": _library.torch_mismatch(record),
        "cuda_kernels": has_kernels,
        "cuda_toolkit": compiled["cuda_runtime_headers"],
        "cuda_archs": archs,
        "cuda_devices": devices,
        "cuda_can_run": can_run,
        "cuda_can_run_why": why,
        "int8_isas": list(compiled["int8_isas"]),
        "int8_isa_best": compiled["int8_isa_best"],
        "int8_isa_env": os.environ.get("QKERNELS_INT8_ISA"),
        "int8_isa_selected": selected,
        "int8_isa_error": isa_error,
        "compiler": compiled["compiler"],
        "python": platform.python_version(),
    }


def format_build_report(info: Dict[str, Any]) -> str:
    """The report as text lines, one subject each."""
    torch_line = "built against %s, running %s" % (
        _library.torch_label(info["torch_built"], info["torch_built_cuda"]),
        _library.torch_label(info["torch_running"], info["torch_running_cuda"]))
    torch_line += ": MISMATCH, rebuild" if info["torch_mismatch"] else ": same"
    if info["cuda_kernels"]:
        cuda_line = "kernels compiled in (toolkit %s; architectures %s)" % (
            info["cuda_toolkit"], ", ".join(info["cuda_archs"]) or "not recorded")
    else:
        cuda_line = "no kernels compiled in"
    cuda_line += "; can run here: %s, %s" % ("yes" if info["cuda_can_run"] else "no", info["cuda_can_run_why"])
    if info["int8_isa_error"]:
        in_use = "none: %s" % info["int8_isa_error"]
    else:
        in_use = info["int8_isa_selected"]
        if info["int8_isa_env"]:
            in_use += " (QKERNELS_INT8_ISA=%s)" % info["int8_isa_env"]
    built_version = info["qkernels_version_built"]
    version_line = info["qkernels_version"]
    if built_version and built_version != info["qkernels_version"]:
        version_line += " (extension built from %s)" % built_version
    rows = [
        ("qkernels", version_line),
        ("extension", info["extension"]),
        ("torch", torch_line),
        ("CUDA", cuda_line),
        ("int8 CPU", "QKERNELS_INT8_ISA choices here: %s; in use: %s" % (", ".join(info["int8_isas"]), in_use)),
        ("compiler", "%s; Python %s" % (info["compiler"], info["python"])),
    ]
    return "\n".join("%-10s %s" % row for row in rows)
