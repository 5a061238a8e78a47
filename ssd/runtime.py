"""Process set-up for the command line: allocator, device, threads, process group, random state.

Nothing here runs at import; ``main_quant.run`` calls ``keep_freed_memory`` and builds a ``Runtime``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import random

import numpy as np
import torch

from .config import UsageError

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
# Freed memory stays in the heap up to this size (mallopt takes an int); allocations up to it come from
# the heap instead of fresh mmaps whose first touch page-faults on every training step.
KEEP_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20


def keep_freed_memory() -> str:
    """Ask glibc's malloc to keep freed memory for reuse: large tensors are otherwise mmapped and returned
    on every free, and re-faulting their pages costs much of a CPU training step on these machines.
    Returns a description of what was set (for the log); raises OSError where glibc is not the C library."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name or "libc.so.6")
    if not hasattr(libc, "mallopt"):
        raise OSError(f"the C library {name} has no mallopt (not glibc)")
    settings = {"M_MMAP_THRESHOLD": (_M_MMAP_THRESHOLD, KEEP_BYTES), "M_TRIM_THRESHOLD": (_M_TRIM_THRESHOLD, KEEP_BYTES),
                "M_TOP_PAD": (_M_TOP_PAD, TOP_PAD_BYTES)}
    for key, (param, value) in settings.items():
        if libc.mallopt(param, value) != 1:
            raise OSError(f"mallopt({key}, {value}) was refused")
    return ", ".join(f"{key}={value >> 20} MiB" for key, (_, value) in settings.items())


class Runtime:
    """Device and process group of this process (torchrun's environment variables, when present)."""

    def __init__(self, use_gpu: bool | None, parallel: bool = True):
        gpu_available = torch.cuda.is_available()
        if use_gpu and not gpu_available:
            raise UsageError("--use_gpu true but no CUDA device is available")
        self.use_gpu = gpu_available if use_gpu is None else use_gpu
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if self.world_size > 1 and not parallel:
            raise UsageError(f"--parallel false, but this process is one of {self.world_size} started by torchrun")
        self.distributed = self.world_size > 1
        if self.use_gpu:
            self.device = torch.device("cuda", self.local_rank if self.distributed else torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
            # share the cores between the processes of this machine
            local = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world_size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))
        if self.distributed and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.use_gpu else "gloo")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def sum(self, *values: float) -> list[float]:
        """The sums over all processes of a few numbers (one collective)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def share_buffers(self, model: torch.nn.Module) -> None:
        """Give every process rank 0's buffers (batch-norm statistics, quantizer state), before an
        evaluation: DDP broadcasts the batch-norm buffers at the start of each step, so the last step
        leaves each process with its own."""
        if self.distributed:
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)

    def data_parallel(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` wrapped in DistributedDataParallel (itself in one process). The quantizers' buffers
        are left out of DDP's per-step buffer broadcast: every process computes the same state already
        (the batch maxima are MAX-reduced across processes), and a range_abs_max window alone is 10000
        floats per layer. Batch-norm statistics are still broadcast from rank 0 (folded batch norm
        quantizes with them)."""
        if not self.distributed:
            return model
        DDP = torch.nn.parallel.DistributedDataParallel
        DDP._set_params_and_buffers_to_ignore_for_model(model, quantizer_buffer_names(model))
        return DDP(model, device_ids=[self.device.index] if self.use_gpu else None)

    def gather(self, obj) -> list | None:
        """Every process's ``obj`` on rank 0 (in rank order), None elsewhere; ``[obj]`` in one process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def quantizer_buffer_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the qkernels quantizers' buffers (scale, window, step, accum, state)."""
    from qkernels.nn.quantizers import quantizers

    owners = {id(m) for m in quantizers(model)}
    return [f"{name}.{buffer}" for name, module in model.named_modules() if id(module) in owners
            for buffer, _ in module.named_buffers(recurse=False)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global generators' states in plain types and tensors (so checkpoints load with weights_only)."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, key.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(key, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
