"""Shared pytest fixtures."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# ../shared beside the checkout: FairFace images and offline weights, present on development machines.
SHARED_ROOT = Path(__file__).resolve().parents[1].parent / "shared"


def require_shared(path: Path) -> Path:
    """``path`` if it exists; otherwise skip the test, or fail it when RC_REQUIRE_SHARED=1."""
    if path.exists():
        return path
    message = f"shared data not found: {path} (set RC_REQUIRE_SHARED=1 to make this a failure)"
    if os.environ.get("RC_REQUIRE_SHARED", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(f"RC_REQUIRE_SHARED is set but {path} is absent")
    pytest.skip(message)


@pytest.fixture
def shared_dir(request) -> Path:
    """The ../shared folder. Paths given to the test's ``shared`` marker, relative to it, must exist too:

    ``@pytest.mark.shared("data/fairface")`` skips (or fails, with RC_REQUIRE_SHARED=1) without them.
    """
    root = require_shared(SHARED_ROOT)
    marker = request.node.get_closest_marker("shared")
    for relative in (marker.args if marker else ()):
        require_shared(root / relative)
    return root


def load_script(path: Path, name: str):
    """A script of the repository (bench/, scripts/) as a module, without running its main: registered in
    sys.modules first, as an import does (dataclasses look their module up there)."""
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


# --- synthetic data and a small trained model, shared by the training and evaluation tests ------------

REPO = Path(__file__).resolve().parents[1]
ARCH = "mobilenetv3_small_050"  # small enough that a test epoch takes a second


@pytest.fixture(scope="session")
def manifests(tmp_path_factory) -> Path:
    """train.txt / val.txt / classes.txt for the 4 synthetic pattern classes, split by identity;
    the images are in ``<manifests>/../images``."""
    from race_classifier.cli import main as cli_main
    from race_classifier.data.synthetic import PATTERNS, generate
    root = tmp_path_factory.mktemp("data")
    generate(root / "images", identities_per_class=6, images_per_identity=3, size=32, seed=1)
    out = root / "manifests"
    assert cli_main(["prepare", "folder", str(root / "images"), "--out", str(out),
                     "--taxonomy", ",".join(PATTERNS), "--val_fraction", "0.34"]) == 0
    return out


def train_args(manifests: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["--dataset", "smoke", "--checkpoint_dir", str(run_dir), "--log_file", str(run_dir / "log.csv"),
            "--train_txt", str(manifests / "train.txt"), "--val_txt", str(manifests / "val.txt"),
            "--arch", ARCH, "--image_size", "32", "--batch_size", "8", "--workers", "0", *extra]


@pytest.fixture(scope="session")
def trained_checkpoints(manifests, tmp_path_factory) -> tuple[Path, Path]:
    """Two small checkpoints trained on the synthetic set (1 and 3 epochs): two real, different models."""
    from race_classifier.training.train import main as train_main
    paths = []
    for epochs in (1, 3):
        run = tmp_path_factory.mktemp(f"model{epochs}")
        assert train_main(train_args(manifests, run, "--num_epochs", str(epochs), "--learning_rate", "0.003")) == 0
        paths.append(run / "best.pt")
    return tuple(paths)


# --- a multi-task model (race, gender, age group), shared by the evaluation and calibration tests of heads ---

def with_gender_and_age(src: Path, dst: Path, drop_race_every: int = 0) -> None:
    """Copy a synthetic manifest adding a gender (from the pattern, so it is learnable) and a FairFace-style
    age range (one per pattern: Child, Teen, Adult, Senior); every few lines lose a label."""
    from race_classifier.data.synthetic import PATTERNS
    lines = []
    for i, line in enumerate(l for l in src.read_text().splitlines() if l and not l.startswith("#")):
        path, label = line.split("\t")[:2]
        gender = "Male" if PATTERNS.index(label) % 2 == 0 else "Female"
        age = ["3-9", "10-19", "20-29", "more than 70"][PATTERNS.index(label)]
        if i % 5 == 1:
            age = ""
        if i % 7 == 2:
            gender = ""
        if drop_race_every and i % drop_race_every == 3:
            label = "-"
        lines.append(f"{path}\t{label}\t{gender}\t{age}")
    dst.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="session")
def multitask_manifests(manifests, tmp_path_factory) -> Path:
    """The synthetic manifests with gender and age columns; some validation images have no race label
    ('-'), some no gender, some no age."""
    out = tmp_path_factory.mktemp("multitask_data")
    with_gender_and_age(manifests / "train.txt", out / "train.txt", drop_race_every=6)
    with_gender_and_age(manifests / "val.txt", out / "val.txt", drop_race_every=6)
    (out / "classes.txt").write_text((manifests / "classes.txt").read_text())
    return out


@pytest.fixture(scope="session")
def multitask_checkpoint(multitask_manifests, tmp_path_factory) -> Path:
    """best.pt of a small model trained with --heads race,gender,age (calibrated, with its MODEL_CARD.md)."""
    from race_classifier.training.train import main as train_main
    run = tmp_path_factory.mktemp("multitask_model")
    assert train_main(train_args(multitask_manifests, run, "--num_epochs", "3", "--learning_rate", "0.003",
                                 "--heads", "race,gender,age")) == 0
    return run / "best.pt"


@pytest.fixture
def one_thread(monkeypatch):
    """Single-threaded kernels: multi-threaded float reductions may differ in the last bits between runs."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)
