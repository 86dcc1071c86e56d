"""Prepared shards (``prepare --shards``): same pixels as the cache path, unreadable images skipped and
named, no complete-looking set after a killed build, read by DataLoader workers and by training."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from race_classifier.cli import main as cli_main
from race_classifier.data import cache as cache_module
from race_classifier.data.cache import INDEX_NAME, ImageCache, cache_size_for, resize_square
from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.image_io import ImageLoadError, load_rgb
from race_classifier.data.manifest import read_manifest
from race_classifier.data.shards import find_shards, shard_dir
from race_classifier.data.transforms import Preprocessing, build_transform
from race_classifier.labels import get_taxonomy
from race_classifier.training.train import main as train_main

SEED5 = get_taxonomy("seed5")
SIZE = 16  # training image size; shards store cache_size_for(SIZE)
TRANSFORM = build_transform(Preprocessing(image_size=SIZE), train=False)


def make_tree(root: Path, bad: str | None = None) -> Path:
    """seed5 tree, 4 identities x 2 images per class: noisy, non-square PNGs and JPEGs (the crop matters);
    ``bad``, if given, is a class whose first image is a truncated JPEG."""
    rng = np.random.default_rng(0)
    for c, cls in enumerate(SEED5.classes):
        for person in range(4):
            for k in range(2):
                path = root / cls / f"p{person}" / f"{k}.{'jpg' if k else 'png'}"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.integers(0, 256, (30 + person, 24 + 2 * c, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(path)
    if bad:
        victim = root / bad / "p0" / "1.jpg"
        victim.write_bytes(victim.read_bytes()[:200])
    return root


def prepare(tree: Path, out: Path, *extra: str) -> int:
    return cli_main(["prepare", "folder", str(tree), "--out", str(out), "--val_fraction", "0.25",
                     "--workers", "0", *extra])


def all_samples(out: Path):
    return read_manifest(out / "train.txt", SEED5) + read_manifest(out / "val.txt", SEED5)


def test_prepared_shards_hold_the_cache_paths_pixels_and_name_unreadable_images(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree", bad="Indian")
    bad_path = str((tree / "Indian" / "p0" / "1.jpg").resolve())
    assert prepare(tree, tmp_path / "out", "--shards", f"{SIZE},24", "--images_per_shard", "7") == 0
    printed = capsys.readouterr().out
    assert bad_path in printed and "unreadable" in printed  # reported by name, not fatal

    samples = all_samples(tmp_path / "out")
    assert len(samples) == 40
    root = shard_dir(tmp_path / "out", SIZE)
    index = json.loads((root / INDEX_NAME).read_text())
    assert index["size"] == cache_size_for(SIZE) and index["count"] == 40
    assert sorted(p.name for p in root.iterdir()) == [INDEX_NAME] + [f"shard-{k:05d}.npy" for k in range(6)]
    assert find_shards("auto", tmp_path / "out" / "train.txt", SIZE) == root
    assert find_shards("auto", tmp_path / "out" / "train.txt", 32) is None  # no set built for 32 px

    shards = ImageCache.open(root).for_samples(samples)
    cache = ImageCache.build_or_load(samples, cache_size_for(SIZE), tmp_path / "cache", workers=0)
    for i, sample in enumerate(samples):
        assert shards.covers(i)
        if sample.path == bad_path:
            with pytest.raises(ImageLoadError) as info:
                shards.get(i)
            assert info.value.path == bad_path
            with pytest.raises(ImageLoadError):
                cache.get(i)
            continue
        np.testing.assert_array_equal(np.asarray(shards.get(i)), np.asarray(cache.get(i)))
        expected = resize_square(load_rgb(sample.path, draft_size=cache_size_for(SIZE)), cache_size_for(SIZE))
        np.testing.assert_array_equal(np.asarray(shards.get(i)), np.asarray(expected))
    assert ImageCache.open(shard_dir(tmp_path / "out", 24)).size == cache_size_for(24, [s.path for s in samples])


def test_the_training_cache_never_upscales_the_typical_image(tmp_path):
    def images(side: int, n: int = 5) -> list[str]:
        paths = []
        for k in range(n):
            path = tmp_path / f"{side}_{k}.jpg"
            Image.fromarray(np.full((side, side + 10, 3), k, np.uint8)).save(path)
            paths.append(str(path))
        return paths
    fairface_like = images(224)
    assert cache_size_for(160, fairface_like) == 184  # headroom for random crops, still a downscale
    assert cache_size_for(224, fairface_like) == 224  # not 258: no upscaling, which would blur
    assert cache_size_for(160, images(100)) == 160    # smaller originals: no smaller than the input
    assert cache_size_for(224) == 258                 # nothing to look at: the headroom alone


def test_workers_open_their_own_maps_and_skip_the_unreadable_image(tmp_path):
    tree = make_tree(tmp_path / "tree", bad="Black")
    assert prepare(tree, tmp_path / "out", "--shards", str(SIZE), "--images_per_shard", "5") == 0
    samples = read_manifest(tmp_path / "out" / "train.txt", SEED5)
    shards = ImageCache.open(shard_dir(tmp_path / "out", SIZE)).for_samples(samples)
    shards.get(0)  # the parent holds a map; forked workers must not use it
    loader = DataLoader(FaceDataset(samples, TRANSFORM, cache=shards), batch_size=4, num_workers=2,
                        collate_fn=collate_skipping_failures)
    seen, failures = [], []
    for batch in loader:
        seen += batch["indices"].tolist()
        failures += batch["failures"]
    bad = [i for i, s in enumerate(samples) if s.path.endswith("Black/p0/1.jpg")]
    assert sorted(seen + [i for i, _ in failures]) == list(range(len(samples)))
    assert [i for i, _ in failures] == bad


def test_killed_build_leaves_no_complete_set_and_a_rerun_completes(tmp_path, monkeypatch):
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    assert prepare(tree, out, "--shards", str(SIZE), "--images_per_shard", "4") == 0
    root = shard_dir(out, SIZE)
    assert (root / INDEX_NAME).is_file()

    calls = {"n": 0}
    real_put = cache_module._ShardWriter.put

    def put_then_die(self, row, pixels):
        calls["n"] += 1
        if calls["n"] == 10:  # mid-way through the third shard
            raise KeyboardInterrupt
        real_put(self, row, pixels)

    monkeypatch.setattr(cache_module._ShardWriter, "put", put_then_die)
    with pytest.raises(KeyboardInterrupt):
        prepare(tree, out, "--shards", str(SIZE), "--images_per_shard", "4")
    assert not (root / INDEX_NAME).exists()  # the old index went first: nothing looks complete
    assert not list(root.glob(".*.tmp"))
    assert find_shards("auto", out / "train.txt", SIZE) is None
    with pytest.raises(FileNotFoundError):
        ImageCache.open(root)

    monkeypatch.setattr(cache_module._ShardWriter, "put", real_put)
    assert prepare(tree, out, "--shards", str(SIZE), "--images_per_shard", "4") == 0
    assert len(ImageCache.open(root).paths) == 40


def test_a_changed_image_is_read_from_its_file(tmp_path, caplog):
    tree = make_tree(tmp_path / "tree")
    assert prepare(tree, tmp_path / "out", "--shards", str(SIZE)) == 0
    samples = all_samples(tmp_path / "out")
    Image.new("RGB", (50, 40), (9, 9, 9)).save(samples[3].path)
    shards = ImageCache.open(shard_dir(tmp_path / "out", SIZE)).for_samples(samples)
    assert not shards.covers(3) and shards.covers(2)
    assert "changed since it was built" in caplog.text
    dataset = FaceDataset(samples, TRANSFORM, cache=shards)
    assert np.all(np.asarray(dataset.load_image(3)) == 9)


def test_training_on_prepared_shards_matches_training_on_the_cache(tmp_path, capsys):
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    assert prepare(tree, out, "--shards", str(SIZE)) == 0
    rows = {}
    for name, extra in (("shards", []), ("cache", ["--shards", "none", "--cache_dir", str(tmp_path / "cache")]),
                        ("files", ["--shards", "none"])):
        run = tmp_path / name
        assert train_main(["--dataset", name, "--checkpoint_dir", str(run), "--train_txt", str(out / "train.txt"),
                           "--val_txt", str(out / "val.txt"), "--arch", "mobilenetv3_small_050", "--image_size",
                           str(SIZE), "--batch_size", "8", "--workers", "0", "--num_epochs", "1",
                           "--hflip", "0", "--color_jitter", "0", *extra]) == 0
        with open(run / "log.csv", newline="") as f:
            rows[name] = next(csv.DictReader(f))
    drop = ("epoch_time_s",)
    same = lambda row: {k: v for k, v in row.items() if k not in drop}  # noqa: E731
    assert same(rows["shards"]) == same(rows["cache"])  # the same pixels, so the same run
    assert rows["files"]["val_loss"] != rows["shards"]["val_loss"]  # the originals differ: the switch worked


@pytest.mark.parametrize("image_size", [SIZE, 28])  # 28: the images' own size, where the old cache upscaled
def test_validation_in_training_sees_the_pixels_evaluation_makes_of_the_files(tmp_path, image_size):
    """Training validates on cached or sharded images; they must be exactly the tensors evaluation (and so the
    model file) makes of the image files, or validation scores something no user will run."""
    from race_classifier.data.dataset import FaceDataset
    from race_classifier.training import config
    from race_classifier.training.distributed import World
    from race_classifier.training.run_data import RunSamples, build_loaders
    tree = make_tree(tmp_path / "tree")
    out = tmp_path / "out"
    assert prepare(tree, out, "--shards", str(image_size)) == 0
    pre = Preprocessing(image_size=image_size)
    val = read_manifest(out / "val.txt", SEED5)
    from_files = FaceDataset(val, build_transform(pre, train=False), draft_size=image_size)
    for extra in ([], ["--shards", "none", "--cache_dir", str(tmp_path / "cache")]):
        args = config.parse_args(["--dataset", "d", "--train_txt", str(out / "train.txt"), "--val_txt",
                                  str(out / "val.txt"), "--image_size", str(image_size), "--workers", "0", *extra])
        loaders = build_loaders(args, World(), RunSamples.read(args), pre, torch.device("cpu"))
        for i in range(len(val)):
            torch.testing.assert_close(loaders.val_set[i]["image"], from_files[i]["image"], rtol=0, atol=0)
