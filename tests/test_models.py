"""Backbones and pretrained weights: timm and torchvision names, offline weight files, safe loading."""
from __future__ import annotations

import pytest
import torch

from race_classifier.models.factory import WeightsMismatchError, create_model, read_state_dict


def test_timm_and_torchvision_backbones_get_a_classifier_for_the_taxonomy():
    x = torch.randn(2, 3, 64, 64)
    for arch in ("mobilenetv3_small_050", "torchvision:mobilenet_v2", "torchvision:resnet18"):
        model = create_model(arch, num_classes=7).eval()
        with torch.no_grad():
            assert model(x).shape == (2, 7), arch


def test_unknown_architecture_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown architecture 'no_such_net'"):
        create_model("no_such_net", 5)
    with pytest.raises(ValueError, match="unknown architecture"):
        create_model("torchvision:no_such_net", 5)


def test_local_weights_file_fills_everything_but_the_classifier(tmp_path):
    source = create_model("torchvision:resnet18", 1000)
    path = tmp_path / "resnet18_imagenet.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    model = create_model("torchvision:resnet18", 5, pretrained=str(path))
    got, want = model.state_dict(), source.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want if not k.startswith("fc."))
    assert got["fc.weight"].shape == (5, 512)


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(create_model("torchvision:resnet18", 1000).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="does not fit this architecture"):
        create_model("torchvision:mobilenet_v2", 5, pretrained=str(path))
    with pytest.raises(FileNotFoundError):
        create_model("torchvision:mobilenet_v2", 5, pretrained=str(tmp_path / "absent.pth"))


def test_weights_files_are_loaded_without_running_pickled_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Payload()}, path)
    with pytest.raises(WeightsMismatchError, match="not a weights file torch can load safely"):
        read_state_dict(path)


@pytest.mark.shared("weights/mobilenet_v2-b0353104.pth")
def test_shared_imagenet_mobilenet_v2_loads_offline(shared_dir):
    model = create_model("torchvision:mobilenet_v2", 5, pretrained=str(shared_dir / "weights/mobilenet_v2-b0353104.pth"))
    reference = torch.load(shared_dir / "weights/mobilenet_v2-b0353104.pth", weights_only=True)
    state = model.state_dict()
    assert torch.equal(state["features.0.0.weight"], reference["features.0.0.weight"])
    assert state["classifier.1.weight"].shape == (5, 1280)


def test_converted_weights_with_other_names_load_by_position_only_when_every_shape_lines_up(tmp_path):
    source = create_model("torchvision:resnet18", 1000)
    renamed = {f"_layer{i}.{k.split('.')[-1]}": v for i, (k, v) in enumerate(source.state_dict().items())}
    path = tmp_path / "converted.pth"
    torch.save(renamed, path)
    model = create_model("torchvision:resnet18", 5, pretrained=str(path))
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], source.state_dict()["layer4.1.conv2.weight"])
    # The same tensors in another order do not line up: refused, never loaded into the wrong places.
    items = list(renamed.items())
    torch.save(dict(items[5:] + items[:5]), path)
    with pytest.raises(WeightsMismatchError, match="does not fit"):
        create_model("torchvision:resnet18", 5, pretrained=str(path))


@pytest.mark.shared("weights/efficientnet-lite0-57934424.pth")
def test_shared_efficientnet_lite0_loads_into_timm_tf_efficientnet_lite0(shared_dir):
    path = shared_dir / "weights/efficientnet-lite0-57934424.pth"
    model = create_model("tf_efficientnet_lite0", 5, pretrained=str(path))
    reference = torch.load(path, weights_only=True)
    assert torch.equal(model.state_dict()["conv_stem.weight"], reference["_conv_stem.weight"])
    assert torch.equal(model.state_dict()["conv_head.weight"], reference["_conv_head.weight"])
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)  # TF's preprocessing, picked up by training


def test_a_new_classifier_on_a_pretrained_timm_backbone_starts_small(tmp_path):
    # timm's EfficientNet init (uniform +-1/sqrt(classes)) is for training from scratch; on pretrained
    # features it gave logits in the tens. A fresh classifier starts near zero; a file's own one is kept.
    torch.manual_seed(0)
    source = create_model("tf_efficientnet_lite0", 1000)
    path = tmp_path / "imagenet.pth"
    torch.save(source.state_dict(), path)
    model = create_model("tf_efficientnet_lite0", 7, pretrained=str(path)).eval()
    assert float(model.classifier.weight.std()) == pytest.approx(0.01, rel=0.1)
    assert not model.classifier.bias.any()
    scratch = create_model("tf_efficientnet_lite0", 7)  # no pretrained backbone: timm's init stands
    assert float(scratch.classifier.weight.std()) > 0.1
    with torch.no_grad():  # on the same features, logits an order of magnitude smaller than timm's init gives
        features = model.forward_head(model.forward_features(torch.randn(4, 3, 64, 64)), pre_logits=True)
        assert model.classifier(features).std() < scratch.classifier(features).std() / 10
    same_shape = create_model("tf_efficientnet_lite0", 1000, pretrained=str(path))
    assert torch.equal(same_shape.classifier.weight, source.classifier.weight)
    # torchvision's classifiers already start small and are not re-drawn: seeded runs stay as they were.
    torch.manual_seed(1)
    plain = create_model("torchvision:mobilenet_v2", 7)
    vision = tmp_path / "mnv2.pth"
    torch.save(create_model("torchvision:mobilenet_v2", 1000).state_dict(), vision)
    torch.manual_seed(1)
    loaded = create_model("torchvision:mobilenet_v2", 7, pretrained=str(vision))
    assert torch.equal(plain.classifier[1].weight, loaded.classifier[1].weight)


def _tiny_checkpoint(path):
    from race_classifier.data.transforms import Preprocessing
    from race_classifier.labels import Taxonomy
    from race_classifier.models.checkpoint import save_checkpoint
    save_checkpoint(path, model=create_model("mobilenetv3_small_050", 3), arch="mobilenetv3_small_050",
                    taxonomy=Taxonomy("abc", ("A", "B", "C")), preprocessing=Preprocessing(image_size=32),
                    train_args={}, epoch=1, metrics={}, history=[])
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("damage", ["no taxonomy", "no preprocessing", "other arch", "other classes",
                                    "no state_dict", "string format_version", "bad heads", "train_args None"])
def test_a_malformed_checkpoint_is_a_clear_error_naming_the_file(tmp_path, damage):
    from race_classifier.models.checkpoint import CheckpointError, load_checkpoint, load_model
    from race_classifier.models.loaders import load_predictor
    ckpt = _tiny_checkpoint(tmp_path / "good.pt")
    if damage == "no taxonomy":
        del ckpt["taxonomy"]
    elif damage == "no preprocessing":
        ckpt["preprocessing"] = {"size": 32}
    elif damage == "other arch":
        ckpt["arch"] = "torchvision:resnet18"
    elif damage == "other classes":
        ckpt["taxonomy"] = {"name": "ab", "classes": ["A", "B"]}
    elif damage == "no state_dict":
        ckpt["state_dict"] = None
    elif damage == "string format_version":
        ckpt["format_version"] = "1"
    elif damage == "bad heads":
        ckpt["heads"] = {"heads": []}
    elif damage == "train_args None":
        ckpt["train_args"] = None
    path = tmp_path / "damaged.pt"
    torch.save(ckpt, path)
    for load in (load_model, load_predictor):
        try:
            load(path)
        except ValueError as e:  # CheckpointError or ModelLoadError: what the CLI reports as an error
            assert str(path) in str(e), (damage, load.__name__, e)
        else:
            assert damage == "train_args None", f"{damage}: {load.__name__} loaded a damaged checkpoint"
    if damage in ("no taxonomy", "no preprocessing", "string format_version"):
        with pytest.raises(CheckpointError, match="damaged.pt"):
            load_checkpoint(path)  # every command reads ckpt["taxonomy"] and ckpt["preprocessing"] after this


def test_a_corrupt_safetensors_file_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsMismatchError, match="weights.safetensors"):
        read_state_dict(path)
