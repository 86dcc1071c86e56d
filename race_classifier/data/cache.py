"""A pre-resized, uint8, memory-mapped copy of a dataset, built once and shared by all workers.

Decoding a 224 px JPEG costs more CPU than a small model's step on it; reading a few kB from a
memory-mapped array costs nearly nothing. The cache is keyed by the image list and size, so a changed
manifest builds a new one. Images that fail to decode are recorded with their reason, not stored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from race_classifier.data.image_io import ImageLoadError, load_rgb
from race_classifier.data.manifest import Sample
from race_classifier.utils import atomic_write_text

log = logging.getLogger(__name__)


def _cache_key(paths: Sequence[str], size: int) -> str:
    h = hashlib.sha1(f"v1:{size}\n".encode())
    for p in paths:
        st = os.stat(p) if os.path.exists(p) else None
        h.update(f"{p}\t{st.st_size if st else -1}\t{int(st.st_mtime) if st else -1}\n".encode())
    return h.hexdigest()[:16]


def resize_square(image: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size``, centre crop: the geometry of the evaluation transform."""
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BILINEAR)


class _Decode(Dataset):
    def __init__(self, paths: Sequence[str], size: int):
        self.paths, self.size = list(paths), size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, np.asarray(resize_square(load_rgb(self.paths[i], draft_size=self.size), self.size)), ""
        except ImageLoadError as e:
            return i, np.zeros((self.size, self.size, 3), np.uint8), e.reason


def _as_list(batch):
    # A module-level function, not a lambda: spawn/forkserver workers receive collate_fn pickled.
    return batch


class ImageCache:
    def __init__(self, array_path: Path, paths: list[str], size: int, errors: dict[int, str]):
        self.array_path, self.paths, self.size, self.errors = array_path, paths, size, errors
        self._array = None  # opened lazily in each worker process: a memmap must not be pickled

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def __len__(self):
        return len(self.paths)

    def get(self, index: int) -> Image.Image:
        if index in self.errors:
            raise ImageLoadError(self.paths[index], self.errors[index])
        if self._array is None:
            self._array = np.load(self.array_path, mmap_mode="r")
        return Image.fromarray(np.array(self._array[index]))

    @classmethod
    def build_or_load(cls, samples: Sequence[Sample], size: int, cache_dir: str | Path,
                      workers: int = 2) -> "ImageCache":
        paths = [s.path for s in samples]
        cache_dir = Path(cache_dir)
        key = _cache_key(paths, size)
        array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
        if meta_path.is_file() and array_path.is_file():
            meta = json.loads(meta_path.read_text())
            return cls(array_path, paths, size, {int(k): v for k, v in meta["errors"].items()})
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp_path = cache_dir / f".{key}.{os.getpid()}.npy.tmp"
        array = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
        errors: dict[int, str] = {}
        loader = DataLoader(_Decode(paths, size), batch_size=64, num_workers=workers,
                            collate_fn=_as_list)
        try:
            for batch in tqdm(loader, desc=f"caching {len(paths)} images at {size}px", unit="batch", disable=None):
                for i, pixels, error in batch:
                    if error:
                        errors[i] = error
                    else:
                        array[i] = pixels
            array.flush()
            del array
            os.replace(tmp_path, array_path)
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise
        # The metadata is written last: its presence means the array is complete.
        atomic_write_text(meta_path, json.dumps({"size": size, "count": len(paths), "errors": errors}))
        if errors:
            log.warning("cache: %d image(s) could not be read and will be skipped, e.g. %s",
                        len(errors), "; ".join(f"{paths[i]}: {r}" for i, r in list(errors.items())[:5]))
        log.info("cache written: %s (%.1f MB)", array_path, array_path.stat().st_size / 1e6)
        return cls(array_path, paths, size, errors)


def cache_size_for(image_size: int) -> int:
    """Cache slightly larger than the input so random-resized crops keep their detail."""
    return int(round(image_size * 1.15))

