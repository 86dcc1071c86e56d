"""ONNX export: metadata that makes the file self-describing, reload through the one loader, parity with
PyTorch on real images, int8 figures consistent with a direct recomputation, the refusal path, and the
loader's errors for wrong inputs and non-ONNX files."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from race_classifier.cli import main as cli_main
from race_classifier.data.manifest import read_manifest
from race_classifier.data.transforms import Preprocessing
from race_classifier.evaluation.runner import predict_samples
from race_classifier.export.exporter import export_checkpoint
from race_classifier.export.onnx import ExportError
from race_classifier.export.options import FP32_TOLERANCE
from race_classifier.labels import get_taxonomy
from race_classifier.models.checkpoint import load_model, save_checkpoint
from race_classifier.models.factory import create_model
from race_classifier.models.loaders import ModelLoadError, load_predictor

PROB_COLUMNS = lambda k: [f"prob_{i}" for i in range(k)]  # noqa: E731


@pytest.fixture(scope="module")
def val_samples(manifests):
    return read_manifest(manifests / "val.txt", get_taxonomy(str(manifests / "classes.txt")))


@pytest.fixture(scope="module")
def exported(trained_checkpoints, manifests, tmp_path_factory):
    """The 3-epoch checkpoint exported to fp32 ONNX by the command, with its report."""
    out = tmp_path_factory.mktemp("export")
    assert cli_main(["export", "--model_path", str(trained_checkpoints[1]), "--output", str(out / "model.onnx"),
                     "--val_txt", str(manifests / "val.txt"), "--report_json", str(out / "report.json")]) == 0
    return out / "model.onnx", json.loads((out / "report.json").read_text())


def _max_prob_diff(a, b, k) -> float:
    return float(np.abs(a[PROB_COLUMNS(k)].to_numpy() - b[PROB_COLUMNS(k)].to_numpy()).max())


def test_export_carries_metadata_and_reloads_without_flags(exported, trained_checkpoints):
    path, _ = exported
    ckpt = load_model(trained_checkpoints[1])
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["race_classifier.format"] == "race-classifier-onnx"
    assert json.loads(props["race_classifier.taxonomy"]) == ckpt.taxonomy.to_dict()
    assert json.loads(props["race_classifier.preprocessing"]) == ckpt.preprocessing.to_dict()
    assert props["race_classifier.arch"] == ckpt.checkpoint["arch"]
    assert json.loads(props["race_classifier.source"])["epoch"] == ckpt.checkpoint["epoch"]

    predictor = load_predictor(path)  # no labels, size, mean or std: the file alone is enough
    assert predictor.kind == "onnx"
    assert predictor.taxonomy.classes == ckpt.taxonomy.classes and predictor.taxonomy.name == ckpt.taxonomy.name
    assert predictor.preprocessing == ckpt.preprocessing

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name, inp.type) == ("input", "logits", "tensor(float)")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [3, 32, 32]  # dynamic batch axis
    for n in (1, 5):
        assert predictor.predict_proba(torch.randn(n, 3, 32, 32)).shape == (n, ckpt.taxonomy.num_classes)


def test_fp32_parity_on_the_pattern_images(exported, trained_checkpoints, val_samples, manifests):
    path, report = exported
    assert report["fp32"]["max_abs_diff"] <= FP32_TOLERANCE and report["n_images"] == len(val_samples)
    tax = get_taxonomy(str(manifests / "classes.txt"))
    reference = predict_samples(load_predictor(trained_checkpoints[1]), val_samples, tax, batch_size=8, workers=0)
    onnx_table = predict_samples(load_predictor(path), val_samples, tax, batch_size=8, workers=0)
    assert _max_prob_diff(reference, onnx_table, tax.num_classes) <= FP32_TOLERANCE
    assert (reference["y_pred"] == onnx_table["y_pred"]).all()
    assert report["accuracy"]["onnx_fp32"] == pytest.approx((onnx_table["y_pred"] == onnx_table["y_true"]).mean())


def test_int8_report_matches_a_direct_recomputation(trained_checkpoints, manifests, val_samples, tmp_path):
    int8, fp32 = tmp_path / "model.int8.onnx", tmp_path / "model.fp32.onnx"
    # The tiny 32 px model's int8 accuracy is whatever it is: the gate is opened, the figures are checked.
    assert cli_main(["export", "--model_path", str(trained_checkpoints[1]), "--output", str(int8),
                     "--fp32_output", str(fp32), "--quantize", "int8", "--calib_txt", str(manifests / "train.txt"),
                     "--calib_images", "32", "--val_txt", str(manifests / "val.txt"), "--max_accuracy_drop", "100",
                     "--report_json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantization"]["mode"] == "static" and report["quantization"]["calibration_images"] == 32

    graph = onnx.load(str(int8))
    ops = {n.op_type for n in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # QDQ format
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["race_classifier.quantization"])["format"] == "QDQ"
    assert props["race_classifier.taxonomy"] == {p.key: p.value for p in onnx.load(str(fp32)).metadata_props}["race_classifier.taxonomy"]

    tax = get_taxonomy(str(manifests / "classes.txt"))
    tables = {name: predict_samples(load_predictor(p), val_samples, tax, batch_size=8, workers=0)
              for name, p in (("fp32", fp32), ("int8", int8))}
    acc = {name: float((t["y_pred"] == t["y_true"]).mean()) for name, t in tables.items()}
    assert report["accuracy"]["onnx_fp32"] == pytest.approx(acc["fp32"])
    assert report["accuracy"]["onnx_int8"] == pytest.approx(acc["int8"])
    agreement = float((tables["fp32"]["y_pred"] == tables["int8"]["y_pred"]).mean())
    assert report["int8_vs_fp32"]["top1_agreement"] == pytest.approx(agreement)
    assert report["int8_vs_fp32"]["max_abs_diff"] == pytest.approx(
        _max_prob_diff(tables["fp32"], tables["int8"], tax.num_classes), abs=1e-6)

    # evaluate takes the .onnx like a checkpoint, and finds the same accuracy.
    csv = tmp_path / "eval.csv"
    assert cli_main(["evaluate", "--model_path", str(int8), "--val_txt", str(manifests / "val.txt"),
                     "--output_csv", str(csv), "--n_boot", "20", "--workers", "0"]) == 0
    metrics = json.loads(csv.with_suffix(".metrics.json").read_text())
    assert metrics["evaluation"]["accuracy"]["value"] == pytest.approx(acc["int8"])


def test_dynamic_int8_without_calibration_images(trained_checkpoints, val_samples, tmp_path):
    report = export_checkpoint(trained_checkpoints[1], tmp_path / "dyn.onnx", quantize="int8",
                               val_samples=val_samples, max_accuracy_drop=100)
    assert report.quantization["mode"] == "dynamic" and report.quantization["convolutions"] == "fp32"
    assert set(report.accuracy) == {"torch", "onnx_fp32", "onnx_int8"}
    assert load_predictor(tmp_path / "dyn.onnx").info["quantization"]["mode"] == "dynamic"


def test_export_refuses_a_model_that_fails_parity(trained_checkpoints, manifests, tmp_path, monkeypatch, caplog):
    real_run = ort.InferenceSession.run

    def drifting_run(self, output_names, feed, *args, **kwargs):  # an ONNX graph that computes something else
        outputs = real_run(self, output_names, feed, *args, **kwargs)
        outputs[0][:, 0] += 0.5
        return outputs

    monkeypatch.setattr(ort.InferenceSession, "run", drifting_run)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code = cli_main(["export", "--model_path", str(trained_checkpoints[1]), "--output", str(out_dir / "model.onnx"),
                     "--val_txt", str(manifests / "val.txt")])
    assert code != 0
    assert list(out_dir.iterdir()) == []  # no file, no temporary left behind
    assert "refusing to write" in caplog.text and "differ from PyTorch" in caplog.text
    with pytest.raises(ExportError, match="refusing"):
        export_checkpoint(trained_checkpoints[1], out_dir / "model.onnx")  # random tensors: refused as well
    assert list(out_dir.iterdir()) == []


def test_clear_errors_for_wrong_inputs_and_non_onnx_files(exported, tmp_path):
    predictor = load_predictor(exported[0])
    with pytest.raises(ModelLoadError, match=r"expects a batch of shape \(N, 3, 32, 32\).*got \(2, 3, 64, 64\)"):
        predictor.predict_proba(torch.randn(2, 3, 64, 64))
    with pytest.raises(ModelLoadError, match=r"3-channel.*got \(2, 1, 32, 32\)"):
        predictor.predict_proba(torch.randn(2, 1, 32, 32))
    with pytest.raises(ModelLoadError, match=r"got \(3, 32, 32\)"):
        predictor.predict_proba(torch.randn(3, 32, 32))
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_text("this is a text file, not a model")
    with pytest.raises(ModelLoadError, match="model.onnx: not an ONNX model"):
        load_predictor(not_onnx)


@pytest.mark.shared("data/fairface/train", "weights/mobilenet_v2-b0353104.pth")
def test_fp32_parity_on_fairface_faces(shared_dir, tmp_path):
    """MobileNetV2 at 112 px with ImageNet weights (fresh 5-class head) on 32 FairFace face crops."""
    torch.manual_seed(0)
    model = create_model("torchvision:mobilenet_v2", 5, pretrained=str(shared_dir / "weights/mobilenet_v2-b0353104.pth"))
    ckpt = tmp_path / "mnv2.pt"
    save_checkpoint(ckpt, model=model, arch="torchvision:mobilenet_v2", taxonomy=get_taxonomy("seed5"),
                    preprocessing=Preprocessing(image_size=112), train_args={}, epoch=0, metrics={}, history=[])
    manifest = tmp_path / "faces.txt"
    manifest.write_text("".join(f"{shared_dir}/data/fairface/train/{i}.jpg\tAsian\n" for i in range(1, 33)))
    report = export_checkpoint(ckpt, tmp_path / "mnv2.onnx", val_samples=read_manifest(manifest, get_taxonomy("seed5")))
    assert report.n_images == 32 and report.images == "validation images"
    assert report.fp32.max_abs_diff <= FP32_TOLERANCE and report.fp32.top1_agreement == 1.0
    assert load_predictor(tmp_path / "mnv2.onnx").preprocessing.image_size == 112


def test_a_multitask_model_exports_with_its_own_validation_manifest(manifests, tmp_path):
    """Multi-task manifests keep images without a race label ('-', for the other heads); export reads them as
    evaluate does: every image for parity, the race-labelled ones for accuracy."""
    from conftest import ARCH, with_gender_and_age
    from race_classifier.data.dataset import preprocessed_batches
    from race_classifier.export.onnx import accuracy
    from race_classifier.heads import AgeBins, HeadLayout
    taxonomy = get_taxonomy(str(manifests / "classes.txt"))
    heads = HeadLayout.build(taxonomy.classes, ("race", "gender", "age"), ("Male", "Female"), AgeBins.parse())
    torch.manual_seed(0)
    model_path = tmp_path / "multitask.pt"
    save_checkpoint(model_path, model=create_model(ARCH, heads.num_outputs), arch=ARCH, taxonomy=taxonomy,
                    preprocessing=Preprocessing(image_size=32), train_args={}, epoch=1, metrics={}, history=[],
                    heads=heads)
    val_txt = tmp_path / "val.txt"
    with_gender_and_age(manifests / "val.txt", val_txt, drop_race_every=4)
    assert any(line.split("\t")[1] == "-" for line in val_txt.read_text().splitlines())
    assert cli_main(["export", "--model_path", str(model_path), "--output", str(tmp_path / "model.onnx"),
                     "--val_txt", str(val_txt), "--report_json", str(tmp_path / "report.json")]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    everything = read_manifest(val_txt, taxonomy, keep_unlabelled=True)
    labelled = [s for s in everything if s.label >= 0]
    assert report["n_images"] == len(everything) and len(labelled) < len(everything)
    predictor = load_predictor(model_path)
    probs = np.concatenate([predictor.predict_proba(x) for x, _ in preprocessed_batches(labelled, predictor.preprocessing)])
    assert report["accuracy"]["torch"] == pytest.approx(accuracy(probs, np.array([s.label for s in labelled])))


def test_export_refuses_to_write_over_its_checkpoint_or_one_output_over_the_other(tmp_path):
    from conftest import ARCH
    model_path = tmp_path / "best.pt"
    save_checkpoint(model_path, model=create_model(ARCH, 3), arch=ARCH, taxonomy=get_taxonomy("A,B,C"),
                    preprocessing=Preprocessing(image_size=32), train_args={}, epoch=1, metrics={}, history=[])
    before = model_path.read_bytes()
    for output, fp32_output in ((model_path, None), (tmp_path / "m.onnx", model_path),
                                (tmp_path / "m.onnx", tmp_path / "." / "m.onnx")):
        with pytest.raises(ValueError, match="would overwrite"):
            export_checkpoint(model_path, output, quantize="int8", fp32_output=fp32_output)
    assert model_path.read_bytes() == before and not (tmp_path / "m.onnx").exists()
    assert cli_main(["export", "--model_path", str(model_path), "--output", str(model_path)]) == 2
    assert model_path.read_bytes() == before


def test_onnx_files_of_one_network_store_its_weights_once(tmp_path):
    """A model and its merged-classes form (the bundled fairface7 and seed5) share one external data file; both
    still compute what they computed before, and running it again changes nothing."""
    from race_classifier.export.onnx import export_graph
    from race_classifier.export.shared_weights import store_weights_once
    from race_classifier.models.merged import MergedRaceClasses
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.BatchNorm2d(32), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 7)).eval()
    merged = MergedRaceClasses(net, [0, 1, 2, 3, 3, 4, 0], 5, temperature=1.3).eval()
    paths = [tmp_path / "fine.onnx", tmp_path / "merged.onnx"]
    for model, path in zip((net, merged), paths):
        export_graph(model, path, image_size=16)
    x = np.random.default_rng(0).normal(size=(3, 3, 16, 16)).astype(np.float32)

    def outputs():
        return [ort.InferenceSession(str(p)).run(None, {"input": x})[0] for p in paths]
    before, sizes = outputs(), [p.stat().st_size for p in paths]
    stats = store_weights_once(paths, "weights.data")
    assert stats["shared"] >= 1 and stats["bytes"] < sum(sizes)  # the conv and linear weights, once
    assert all(p.stat().st_size < s for p, s in zip(paths, sizes))
    assert all(np.array_equal(a, b) for a, b in zip(before, outputs()))
    data = (tmp_path / "weights.data").read_bytes()
    assert store_weights_once(paths, "weights.data") == stats and (tmp_path / "weights.data").read_bytes() == data
