"""FaceDataset, collate_skipping_failures and ImageCache on small real image files, one of them corrupt."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from race_classifier.data import cache as cache_module
from race_classifier.data.cache import ImageCache, resize_square
from race_classifier.data.dataset import FaceDataset, collate_skipping_failures
from race_classifier.data.image_io import ImageLoadError, load_rgb
from race_classifier.data.manifest import Sample
from race_classifier.data.transforms import Preprocessing, build_transform

SIZE = 16
TRANSFORM = build_transform(Preprocessing(image_size=SIZE), train=False)


def make_images(folder: Path, count: int, bad: int) -> list[Sample]:
    """``count`` small images of distinct content; the one at index ``bad`` is a truncated JPEG."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(count):
        if i == bad:
            full = folder / "full.jpg"
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(full, quality=90)
            path = folder / f"{i:02d}_bad.jpg"
            path.write_bytes(full.read_bytes()[:300])
            full.unlink()
        else:
            path = folder / f"{i:02d}.png"
            # Non-square, so resize_square's crop matters; noise so every pixel is checked.
            Image.fromarray(rng.integers(0, 256, (30 + i, 24, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(str(path), i % 5, line=i + 1))
    return samples


@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    return make_images(tmp_path / "imgs", count=7, bad=3)


# --- FaceDataset and the collate function --------------------------------------------------------

def test_getitem_good_and_bad(samples):
    dataset = FaceDataset(samples, TRANSFORM)
    assert len(dataset) == 7
    assert dataset.labels == [s.label for s in samples]
    good = dataset[2]
    assert set(good) == {"index", "image", "targets"}
    assert good["index"] == 2 and good["targets"].tolist() == [samples[2].label]
    assert isinstance(good["image"], torch.Tensor) and good["image"].shape == (3, SIZE, SIZE)
    bad = dataset[3]
    assert set(bad) == {"index", "error"}
    assert bad["index"] == 3
    assert "truncated" in bad["error"] or "unreadable" in bad["error"]


def test_collate_drops_failures(samples):
    dataset = FaceDataset(samples, TRANSFORM)
    batch = collate_skipping_failures([dataset[i] for i in (1, 3, 4, 6)])
    assert batch["images"].shape == (3, 3, SIZE, SIZE)
    assert batch["labels"].tolist() == [samples[i].label for i in (1, 4, 6)]
    assert batch["indices"].tolist() == [1, 4, 6]
    assert batch["labels"].dtype == torch.long and batch["indices"].dtype == torch.long
    assert len(batch["failures"]) == 1
    index, reason = batch["failures"][0]
    assert index == 3
    assert reason == dataset[3]["error"]
    # Each stacked image is that sample's transformed image.
    torch.testing.assert_close(batch["images"][1], dataset[4]["image"])


def test_collate_only_failures(samples):
    dataset = FaceDataset(samples, TRANSFORM)
    batch = collate_skipping_failures([dataset[3], {"index": 9, "error": "file not found"}])
    assert batch["images"] is None
    assert batch["labels"].numel() == 0 and batch["indices"].numel() == 0
    assert [i for i, _ in batch["failures"]] == [3, 9]
    assert batch["failures"][1] == (9, "file not found")


def test_missing_file_is_a_failure_record(tmp_path, samples):
    dataset = FaceDataset(samples + [Sample(str(tmp_path / "gone.jpg"), 1)], TRANSFORM)
    assert dataset[7] == {"index": 7, "error": "file not found"}


def test_dataloader_with_workers_sees_every_good_image_once(samples):
    dataset = FaceDataset(samples, TRANSFORM)
    loader = DataLoader(dataset, batch_size=3, shuffle=True, num_workers=2,
                        collate_fn=collate_skipping_failures, generator=torch.Generator().manual_seed(0))
    seen, labels, failures = [], {}, []
    for batch in loader:
        if batch["images"] is not None:
            assert batch["images"].shape[0] == len(batch["indices"])
        for i, lab in zip(batch["indices"].tolist(), batch["labels"].tolist()):
            seen.append(i)
            labels[i] = lab
        failures.extend(batch["failures"])
    assert sorted(seen) == [0, 1, 2, 4, 5, 6]
    assert labels == {i: samples[i].label for i in seen}
    assert [i for i, _ in failures] == [3]


# --- ImageCache ----------------------------------------------------------------------------------

def test_cache_build_then_reuse(tmp_path):
    samples = make_images(tmp_path / "imgs", count=20, bad=7)
    cache_dir = tmp_path / "cache"
    cache = ImageCache.build_or_load(samples, SIZE, cache_dir, workers=2)
    assert len(cache) == 20
    assert set(cache.errors) == {7}
    files = sorted(p.name for p in cache.root.iterdir())
    assert files == ["index.json", "shard-00000.npy"]  # one shard set, no temporary left
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.root.iterdir()}

    again = ImageCache.build_or_load(samples, SIZE, cache_dir, workers=2)
    assert again.root == cache.root
    assert again.errors == cache.errors
    assert {p.name: p.stat().st_mtime_ns for p in cache.root.iterdir()} == stamps  # not rebuilt

    for i in (0, 8, 19):
        expected = np.asarray(resize_square(load_rgb(samples[i].path), SIZE))
        got = again.get(i)
        assert got.mode == "RGB" and got.size == (SIZE, SIZE)
        np.testing.assert_array_equal(np.asarray(got), expected)

    with pytest.raises(ImageLoadError) as info:
        again.get(7)
    assert info.value.path == samples[7].path
    assert info.value.reason == cache.errors[7]


def test_cache_rebuilt_when_an_image_changes(tmp_path):
    samples = make_images(tmp_path / "imgs", count=4, bad=2)
    cache_dir = tmp_path / "cache"
    first = ImageCache.build_or_load(samples, SIZE, cache_dir, workers=0)
    Image.new("RGB", (50, 50), (9, 9, 9)).save(samples[0].path)  # different size on disk
    second = ImageCache.build_or_load(samples, SIZE, cache_dir, workers=0)
    assert second.root != first.root
    assert np.all(np.asarray(second.get(0)) == 9)
    other_size = ImageCache.build_or_load(samples, SIZE + 2, cache_dir, workers=0)
    assert other_size.root not in (first.root, second.root)
    assert other_size.get(1).size == (SIZE + 2, SIZE + 2)


def _rewrite_within_the_same_second(path: str, colour: tuple[int, int, int]) -> None:
    """Replace an image by another of the same byte size (BMP), its mtime in the same whole second as before."""
    second = Path(path).stat().st_mtime_ns // 1_000_000_000 * 1_000_000_000
    Image.new("RGB", (20, 20), colour).save(path, format="BMP")
    os.utime(path, ns=(second + 700_000_000, second + 700_000_000))


def test_cache_never_serves_an_image_rewritten_within_the_second_of_its_stamp(tmp_path):
    """Stamps kept whole seconds: an image replaced by one of the same size in the same second came back stale
    from --cache_dir (and from prepared shards) for the rest of the run."""
    path = tmp_path / "a.bmp"
    Image.new("RGB", (20, 20), (255, 0, 0)).save(path, format="BMP")
    second = path.stat().st_mtime_ns // 1_000_000_000 * 1_000_000_000
    os.utime(path, ns=(second + 100_000_000, second + 100_000_000))
    samples = [Sample(str(path), 0)]
    ImageCache.build_or_load(samples, SIZE, tmp_path / "cache", workers=0)
    _rewrite_within_the_same_second(str(path), (0, 0, 255))
    for cache in (ImageCache.build_or_load(samples, SIZE, tmp_path / "cache", workers=0),  # --cache_dir
                  ImageCache.open(next((tmp_path / "cache").iterdir())).for_samples(samples)):  # shards
        dataset = FaceDataset(samples, TRANSFORM, cache=cache)
        assert tuple(np.asarray(dataset.load_image(0))[0, 0]) == (0, 0, 255)


def test_an_index_with_whole_second_stamps_still_covers_unchanged_images(tmp_path):
    """Sets built before nanosecond stamps keep serving their unchanged images (no rebuild needed)."""
    import json
    samples = make_images(tmp_path / "imgs", count=3, bad=-1)
    cache = ImageCache.build([s.path for s in samples], SIZE, tmp_path / "set", workers=0)
    index = cache.root / cache_module.INDEX_NAME
    meta = json.loads(index.read_text())
    del meta["mtime"]
    meta["images"] = [[p, b, m // 1_000_000_000] for p, b, m in meta["images"]]
    index.write_text(json.dumps(meta))
    old = ImageCache.open(cache.root).for_samples(samples)
    assert all(old.covers(i) for i in range(3))
    Image.new("RGB", (50, 50), (9, 9, 9)).save(samples[1].path)
    assert not ImageCache.open(cache.root).for_samples(samples).covers(1)


def test_a_build_leaves_the_partial_shards_of_a_build_still_running_alone(tmp_path):
    """Two runs building the same --cache_dir set at once: the second deleted the first's partial shard as a
    killed build's leftover, and the first run then stopped (FileNotFoundError renaming it). Only the
    leftovers of processes that no longer run are removed."""
    import subprocess
    import sys
    samples = make_images(tmp_path / "imgs", count=3, bad=-1)
    root = tmp_path / "set"
    root.mkdir()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = root / f".shard-00000.npy.{running.pid}.tmp"
        live.write_bytes(b"being written")
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout.strip()
        stale = root / f".shard-00000.npy.{dead}.tmp"
        stale.write_bytes(b"killed build")
        ImageCache.build([s.path for s in samples], SIZE, root, workers=0)
        assert live.exists()
        assert not stale.exists()
    finally:
        running.kill()
        running.wait()


def test_cache_pickles_without_its_memmap(tmp_path):
    samples = make_images(tmp_path / "imgs", count=5, bad=1)
    cache = ImageCache.build_or_load(samples, SIZE, tmp_path / "cache", workers=0)
    first = np.asarray(cache.get(0))
    assert cache._maps  # opened by get()
    data = pickle.dumps(cache)
    assert len(data) < (cache.root / cache.shards[0]).stat().st_size  # the pixels did not travel
    clone = pickle.loads(data)
    assert not clone._maps
    assert cache._maps  # pickling did not close the original's map
    np.testing.assert_array_equal(np.asarray(clone.get(0)), first)
    assert clone.errors == cache.errors


def test_cache_decode_loader_is_picklable(tmp_path, monkeypatch):
    """Under the spawn/forkserver start methods (macOS, Windows, Python 3.14) every DataLoader
    argument is pickled to the workers; a lambda collate_fn would fail there."""
    seen = []

    class RecordingLoader(DataLoader):
        def __init__(self, *args, **kwargs):
            seen.append(kwargs.get("collate_fn"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(cache_module, "DataLoader", RecordingLoader)
    samples = make_images(tmp_path / "imgs", count=3, bad=1)
    ImageCache.build_or_load(samples, SIZE, tmp_path / "cache", workers=0)
    assert len(seen) == 1
    collate = pickle.loads(pickle.dumps(seen[0]))
    assert collate([(0, "x", "")]) == [(0, "x", "")]


def test_dataset_over_cache_with_workers(tmp_path):
    samples = make_images(tmp_path / "imgs", count=8, bad=5)
    cache = ImageCache.build_or_load(samples, SIZE, tmp_path / "cache", workers=0)
    cache.get(0)  # the parent has the map open; workers must open their own
    dataset = FaceDataset(samples, TRANSFORM, cache=cache)
    loader = DataLoader(dataset, batch_size=4, num_workers=2, collate_fn=collate_skipping_failures)
    seen, failures = [], []
    for batch in loader:
        seen.extend(batch["indices"].tolist())
        failures.extend(batch["failures"])
    assert sorted(seen) == [0, 1, 2, 3, 4, 6, 7]
    assert failures == [(5, cache.errors[5])]
