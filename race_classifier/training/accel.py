"""Where and how fast a run computes: the device, mixed precision, torch.compile."""
from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from race_classifier.training import TrainingError


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_amp(spec: str, device: torch.device) -> torch.dtype | None:
    if spec == "off" or (device.type != "cuda" and spec == "auto"):
        return None
    if device.type != "cuda":
        if spec == "fp16":
            raise TrainingError("--amp fp16 needs CUDA (fp16 without a loss scaler underflows); use bf16 on CPU")
        return torch.bfloat16
    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile's default backend (inductor) cannot work on ``device`` here, or None: it generates
    Triton kernels on a GPU and C++ on a CPU, and says so only at the first step, deep in a traceback."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton
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
    raise TrainingError(f"--compile: {reason}; run without --compile")


def is_compile_error(error: BaseException) -> bool:
    from torch._dynamo.exc import TorchDynamoException
    return isinstance(error, TorchDynamoException)
