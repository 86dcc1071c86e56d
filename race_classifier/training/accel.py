"""How fast a run computes: torch.compile (the device and mixed precision are resolved in
race_classifier/device.py, the same for every command)."""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from race_classifier.training import TrainingError


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile's default backend (inductor) cannot work on ``device`` here, or None: it generates
    Triton kernels on a GPU and C++ on a CPU, and says so only at the first step, deep in a traceback."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton  # torch internals: loaded only when --compile is asked
        return None if has_triton() else "torch.compile on a GPU needs Triton, which is not installed"
    compilers = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in compilers):
        return "torch.compile on a CPU needs a C++ compiler (g++ or clang++; none found, and CXX is not set)"
    return None


def compile_model(model: nn.Module, device: torch.device) -> nn.Module:
    reason = compile_unavailable(device)
    if reason is None:
        try:
            return torch.compile(model)
        except RuntimeError as e:  # e.g. a Python version or platform that torch.compile does not support
            reason = str(e).splitlines()[0]
    raise TrainingError(f"--compile: {reason}; run without --compile (--no-compile where a config sets it)")


def is_compile_error(error: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException  # slow to import: only once a step has failed
    return isinstance(error, TorchDynamoException)
