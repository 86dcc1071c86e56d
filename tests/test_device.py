"""--device and --amp, resolved in one place (race_classifier/device.py) for every command."""
from __future__ import annotations

import pytest
import torch

from race_classifier.device import PrecisionError, precision_name, resolve_device, resolve_precision

CPU = torch.device("cpu")


def test_auto_is_the_cpu_without_cuda_and_other_specs_are_torchs(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == CPU
    assert resolve_device("cpu") == CPU
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # not checked against the machine
    assert resolve_device(CPU) is CPU


def test_auto_is_the_gpu_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


def test_precision_on_a_cpu():
    assert resolve_precision("off", CPU) is None
    assert resolve_precision("auto", CPU) is None  # bf16 pays off only on CPUs with bf16 units: asked by name
    assert resolve_precision("bf16", CPU) is torch.bfloat16
    with pytest.raises(PrecisionError, match="fp16 needs a CUDA device .*; on a CPU use bf16"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'fp8': one of off, auto, bf16, fp16"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("bf16_supported, auto", [(True, torch.bfloat16), (False, torch.float16)])
def test_precision_on_cuda(monkeypatch, bf16_supported, auto):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_supported)
    gpu = torch.device("cuda", 0)  # a device object only: nothing runs on it
    assert resolve_precision("auto", gpu) is auto
    assert resolve_precision("fp16", gpu) is torch.float16
    assert resolve_precision("bf16", gpu) is torch.bfloat16
    assert resolve_precision("off", gpu) is None


def test_precision_names_are_the_amp_choices():
    assert precision_name(torch.bfloat16) == "bf16" and precision_name(torch.float16) == "fp16"
