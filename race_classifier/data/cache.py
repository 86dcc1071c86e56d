"""Pre-resized uint8 copies of a dataset's images, in memory-mapped shards shared by all workers.

Decoding a 224 px JPEG costs more CPU than a small model's step on it; reading a few kB from a
memory-mapped array costs nearly nothing. A *shard set* is a folder::

    index.json          size, images per shard, shard files, every image's path, bytes and mtime, errors
    shard-00000.npy     (n, size, size, 3) uint8, n <= images_per_shard
    shard-00001.npy     ...

Shards keep 250,000+ images out of one giant file, and a worker maps only the shards it reads. The
index is written last, atomically, and removed before a rebuild starts: a set without ``index.json``
is incomplete (a killed build) and is never read. Images that fail to decode are recorded with their
reason, not stored; reading one raises ImageLoadError naming the file.

Two ways to get one: ``prepare --shards`` writes ``shards/<image size>/`` beside the manifests
(``data/shards.py``), and ``--cache_dir`` builds one per image list and size at training start
(``ImageCache.build_or_load``, keyed so that a changed manifest or image builds a new one).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from race_classifier.data.image_io import ImageLoadError, load_rgb
from race_classifier.data.manifest import Sample
from race_classifier.data.options import IMAGES_PER_SHARD
from race_classifier.utils import atomic_write_text, progress_bar

log = logging.getLogger(__name__)

INDEX_NAME = "index.json"
FORMAT_VERSION = 2
MAX_LISTED = 20


def _cache_key(paths: Sequence[str], size: int) -> str:
    h = hashlib.sha1(f"v2:{size}\n".encode())  # v2: resize_square as the eval transform
    for p in paths:
        st = os.stat(p) if os.path.exists(p) else None
        h.update(f"{p}\t{st.st_size if st else -1}\t{int(st.st_mtime) if st else -1}\n".encode())
    return h.hexdigest()[:16]


def _file_stamp(path: str, ns: bool = True) -> tuple[int, int]:
    """(bytes, mtime in nanoseconds) of a file, (-1, -1) when it is absent: what says it changed. ``ns``
    False: whole seconds, as indexes written before nanosecond stamps hold them (a file rewritten within the
    second of a build, at the same size, then looks unchanged)."""
    try:
        st = os.stat(path)
    except OSError:
        return -1, -1
    return st.st_size, (st.st_mtime_ns if ns else int(st.st_mtime))


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, centre crop, with the very calls of the evaluation transform (timm's, at
    crop_pct 1): an image cached at the input size is then exactly what evaluation makes of the file."""
    return F.center_crop(F.resize(image, size, interpolation=InterpolationMode.BILINEAR), size)


class _Decode(Dataset):
    def __init__(self, paths: Sequence[str], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, np.asarray(resize_square(load_rgb(self.paths[i], draft_size=self.size), self.size)), ""
        except ImageLoadError as e:
            return i, None, e.reason


def _as_list(batch):
    # A module-level function, not a lambda: spawn/forkserver workers receive collate_fn pickled.
    return batch


def _writer_alive(tmp: Path) -> bool:
    """Whether the process that is writing a temporary shard (``.shard-00000.npy.<pid>.tmp``) still runs."""
    try:
        pid = int(tmp.name.rsplit(".", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid <= 0 or pid == os.getpid():
        return False  # this process builds one set at a time: its own leftover is from an aborted build
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists (PermissionError: it does, not ours)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.npy"


class _ShardWriter:
    """Fills shards in row order; each is written under a temporary name and renamed when full."""

    def __init__(self, root: Path, count: int, size: int, per_shard: int):
        self.root, self.count, self.size, self.per_shard = root, count, size, per_shard
        self.names: list[str] = []
        self._array, self._tmp, self._end = None, None, 0

    def put(self, row: int, pixels: np.ndarray | None) -> None:
        if row >= self._end:
            self._open(row // self.per_shard)
        if pixels is not None:  # an unreadable image's row stays zeros; the index records why
            self._array[row % self.per_shard] = pixels
        if row + 1 == self._end:
            self._close()

    def _open(self, k: int) -> None:
        start, self._end = k * self.per_shard, min((k + 1) * self.per_shard, self.count)
        self._tmp = self.root / f".{_shard_name(k)}.{os.getpid()}.tmp"
        self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8,
                                                shape=(self._end - start, self.size, self.size, 3))
        self.names.append(_shard_name(k))

    def _close(self) -> None:
        self._array.flush()
        self._array = None
        os.replace(self._tmp, self.root / self.names[-1])
        self._tmp = None

    def abort(self) -> None:
        self._array = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


class ImageCache:
    """A shard set as seen by one dataset: ``rows[i]`` is the stored row of the dataset's i-th image,
    -1 where the set does not hold it (``covers(i)`` is False: read that image from its file)."""

    def __init__(self, root: Path, size: int, per_shard: int, shards: list[str], paths: list[str],
                 errors: dict[int, str], rows: list[int] | None = None,
                 stamps: list[tuple[int, int]] | None = None, stamps_ns: bool = True):
        self.root, self.size, self.per_shard, self.shards = Path(root), size, per_shard, shards
        self.paths, self.errors, self._stamps = paths, errors, stamps  # by stored row
        self._stamps_ns = stamps_ns  # False: an older index's whole-second mtimes
        self.rows = list(range(len(paths))) if rows is None else rows
        self._maps: dict[int, np.ndarray] = {}
        self._pid = os.getpid()

    # Maps are opened lazily in each worker process: they must not be pickled (spawn) nor inherited (fork).
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_maps"], state["_pid"] = {}, None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def covers(self, index: int) -> bool:
        return self.rows[index] >= 0

    def get(self, index: int) -> Image.Image:
        row = self.rows[index]
        if row < 0:
            raise KeyError(f"image {index} is not in the shard set {self.root}")
        if row in self.errors:
            raise ImageLoadError(self.paths[row], self.errors[row])
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        k = row // self.per_shard
        if k not in self._maps:
            self._maps[k] = np.load(self.root / self.shards[k], mmap_mode="r")
        return Image.fromarray(np.array(self._maps[k][row % self.per_shard]))

    def for_samples(self, samples: Sequence[Sample]) -> "ImageCache":
        """This set seen by a dataset of ``samples``: each found by path. An image the set lacks, or whose
        file changed since the set was built, is read from its file (and counted in a warning)."""
        stamps = self._stamps or [_file_stamp(p, self._stamps_ns) for p in self.paths]
        by_path = {p: i for i, p in enumerate(self.paths)}
        rows, stale = [], []
        for s in samples:
            row = by_path.get(s.path, -1)
            if row >= 0 and stamps[row] != _file_stamp(s.path, self._stamps_ns):
                row = -1
            if row < 0:
                stale.append(s.path)
            rows.append(row)
        if stale:
            log.warning("%d of %d image(s) are not in the shard set %s or changed since it was built; they are "
                        "read from their files (rebuild the shards to speed them up), e.g. %s", len(stale),
                        len(samples), self.root, "; ".join(stale[:5]))
        return ImageCache(self.root, self.size, self.per_shard, self.shards, self.paths, self.errors, rows,
                          self._stamps, self._stamps_ns)

    # -- on disk ---------------------------------------------------------------------------------

    @classmethod
    def open(cls, root: str | Path) -> "ImageCache":
        """A complete shard set; FileNotFoundError when ``root`` has no index (none, or a killed build)."""
        root = Path(root)
        index_path = root / INDEX_NAME
        if not index_path.is_file():
            raise FileNotFoundError(f"no complete shard set in {root} (no {INDEX_NAME})")
        meta = json.loads(index_path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT_VERSION:
            raise FileNotFoundError(f"{index_path}: shard format {meta.get('format')}, expected {FORMAT_VERSION}")
        return cls(root, meta["size"], meta["images_per_shard"], meta["shards"], [p for p, _, _ in meta["images"]],
                   {int(k): v for k, v in meta["errors"].items()}, stamps=[(b, m) for _, b, m in meta["images"]],
                   stamps_ns=meta.get("mtime") == "ns")

    @classmethod
    def build(cls, paths: Sequence[str], size: int, root: str | Path, workers: int = 2,
              per_shard: int = IMAGES_PER_SHARD) -> "ImageCache":
        """Decode, resize (``resize_square``) and store ``paths`` as a shard set in ``root``."""
        paths, root = list(paths), Path(root)
        if not paths:
            raise ValueError("no images to store")
        root.mkdir(parents=True, exist_ok=True)
        # From here until the new index is written, the folder holds no complete set.
        (root / INDEX_NAME).unlink(missing_ok=True)
        for leftover in root.glob(".shard-*.tmp"):  # a killed build's partial shards
            if not _writer_alive(leftover):  # not those of a build of the same set still running (another run)
                leftover.unlink(missing_ok=True)
        # Stamped before decoding: a file replaced during the build is then seen as changed.
        stamps = [_file_stamp(p) for p in paths]
        writer = _ShardWriter(root, len(paths), size, per_shard)
        errors: dict[int, str] = {}
        # Its own generator: building a set must not draw from the run's RNG (same run with or without it).
        loader = DataLoader(_Decode(paths, size), batch_size=64, num_workers=workers, collate_fn=_as_list,
                            generator=torch.Generator())
        try:
            for batch in progress_bar(loader, f"storing {len(paths)} images at {size}px"):
                for i, pixels, error in batch:
                    if error:
                        errors[i] = error
                    writer.put(i, pixels)
        except BaseException:
            writer.abort()
            raise
        meta = {"format": FORMAT_VERSION, "size": size, "count": len(paths), "images_per_shard": per_shard,
                "shards": writer.names, "errors": {str(i): r for i, r in errors.items()}, "mtime": "ns",
                "images": [[p, b, m] for p, (b, m) in zip(paths, stamps)]}
        atomic_write_text(root / INDEX_NAME, json.dumps(meta))  # last: its presence means the set is complete
        for old in set(p.name for p in root.glob("shard-*.npy")) - set(writer.names):  # a larger set's tail
            (root / old).unlink(missing_ok=True)
        if errors:
            shown = "\n  ".join(f"{paths[i]}: {r}" for i, r in list(errors.items())[:MAX_LISTED])
            more = f"\n  ... and {len(errors) - MAX_LISTED} more" if len(errors) > MAX_LISTED else ""
            log.warning("%d image(s) could not be read; they are skipped (listed in %s):\n  %s%s",
                        len(errors), root / INDEX_NAME, shown, more)
        log.info("shard set written: %s (%d image(s) in %d shard(s), %.1f MB)", root, len(paths), len(writer.names),
                 sum((root / n).stat().st_size for n in writer.names) / 1e6)
        return cls.open(root)

    @classmethod
    def build_or_load(cls, samples: Sequence[Sample], size: int, cache_dir: str | Path,
                      workers: int = 2) -> "ImageCache":
        """``--cache_dir``: the shard set of exactly these images at this size, built on first use. The key
        knows mtimes to the second only: an image rewritten within that second at the same size is found by
        its stamp (``for_samples``) and read from its file."""
        paths = [s.path for s in samples]
        root = Path(cache_dir) / _cache_key(paths, size)
        if (root / INDEX_NAME).is_file():
            return cls.open(root).for_samples(samples)
        return cls.build(paths, size, root, workers).for_samples(samples)


def typical_short_side(paths: Sequence[str], sample: int = 32) -> int | None:
    """Median shorter side of up to ``sample`` of the images, spread over the list (headers only)."""
    sides = []
    for p in list(paths)[::max(1, len(paths) // sample)][:sample]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except (OSError, ValueError):  # unreadable: the cache build reports it
            continue
    return int(np.median(sides)) if sides else None


def cache_size_for(image_size: int, paths: Sequence[str] = ()) -> int:
    """Side of the training images' cache: slightly larger than the input so random-resized crops keep their
    detail, but not larger than the images typically are. Upscaled there and scaled back down by the
    transform, they would be blurrier than anything the model sees at inference (FairFace's 224 px crops
    stored at 258 px for 224 px training cost 1.4 points of accuracy on sharp images)."""
    size = int(round(image_size * 1.15))
    typical = typical_short_side(paths) if paths else None
    return size if typical is None else max(image_size, min(size, typical))
