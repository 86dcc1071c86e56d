"""Where a model runs and in what precision: --device and --amp mean the same in every command (train,
evaluate, predict, serve, soft-labels), so they are resolved here, in the bottom layer (torch only)."""
from __future__ import annotations

import torch

PRECISIONS = ("off", "auto", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class PrecisionError(ValueError):
    """--amp names no precision, or one the device cannot run (fp16 off CUDA)."""


def resolve_device(spec: str | torch.device) -> torch.device:
    """auto: the GPU when CUDA is there, else the CPU; anything else (cpu, cuda, cuda:1) as torch reads it.
    An absent GPU is not refused here: torch says so where it is first used (torchrun's processes check
    first, training/distributed.py, as each must hold one)."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_precision(spec: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype --amp ``spec`` asks for on ``device``; None runs in fp32.

    auto: on CUDA bf16 where the GPU has it, else fp16; on a CPU fp32, as bf16 is faster only on CPUs with
    bf16 units (AVX512-BF16/AMX), so it is asked for by name. fp16 is refused off CUDA: its narrow exponent
    range underflows without the loss scaling CUDA training does, where bf16 keeps fp32's range."""
    if spec not in PRECISIONS:
        raise PrecisionError(f"unknown precision {spec!r}: one of {', '.join(PRECISIONS)}")
    if spec == "off" or (spec == "auto" and device.type != "cuda"):
        return None
    if spec == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if spec == "fp16" and device.type != "cuda":
        raise PrecisionError("--amp fp16 needs a CUDA device (fp16 without a loss scaler underflows); "
                             "on a CPU use bf16")
    return _DTYPES[spec]


def precision_name(dtype: torch.dtype) -> str:
    """'bf16' or 'fp16': how --amp names an autocast dtype (for records such as a predictor's info)."""
    return next(name for name, d in _DTYPES.items() if d == dtype)
