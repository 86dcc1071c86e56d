"""load_rgb on real files: every mode becomes 8-bit RGB, EXIF orientation is honoured, failures are ImageLoadError."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from race_classifier.data.image_io import ImageLoadError, load_rgb


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def noisy_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def test_rgb_jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (30, 20), (200, 40, 10)).save(path, quality=95)
    image = load_rgb(path)
    assert image.size == (30, 20)
    assert np.abs(pixels(image)[10, 15].astype(int) - (200, 40, 10)).max() <= 3


def test_greyscale_becomes_rgb(tmp_path):
    path = tmp_path / "grey.png"
    a = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (8, 1))
    Image.fromarray(a, "L").save(path)
    out = pixels(load_rgb(path))
    assert out.shape == (8, 25, 3)
    for channel in range(3):
        np.testing.assert_array_equal(out[..., channel], a)


def test_rgba_transparency_composited_on_mid_grey(tmp_path):
    path = tmp_path / "rgba.png"
    a = np.zeros((10, 10, 4), np.uint8)
    a[...] = (255, 0, 0, 255)          # opaque red
    a[0, 0] = (255, 0, 0, 0)           # fully transparent (red underneath, must not show)
    a[0, 1] = (0, 0, 255, 0)           # fully transparent blue
    a[5, 5] = (0, 0, 0, 0)             # fully transparent black
    Image.fromarray(a, "RGBA").save(path)
    out = pixels(load_rgb(path))
    assert out.shape == (10, 10, 3)
    for y, x in ((0, 0), (0, 1), (5, 5)):
        assert tuple(out[y, x]) == (128, 128, 128)
    assert tuple(out[9, 9]) == (255, 0, 0)


def test_half_transparent_pixel_is_blended(tmp_path):
    path = tmp_path / "half.png"
    a = np.zeros((2, 2, 4), np.uint8)
    a[...] = (255, 255, 255, 128)
    Image.fromarray(a, "RGBA").save(path)
    value = pixels(load_rgb(path))[0, 0]
    assert np.all((value >= 190) & (value <= 193))  # 128 + (255 - 128) * 128/255 ~ 191.7


def test_palette_image(tmp_path):
    path = tmp_path / "p.png"
    image = Image.new("P", (6, 4), 0)
    image.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    image.putpixel((5, 3), 1)
    image.save(path)
    assert Image.open(path).mode == "P"
    out = pixels(load_rgb(path))
    assert tuple(out[0, 0]) == (10, 20, 30)
    assert tuple(out[3, 5]) == (200, 100, 50)


def test_palette_image_with_transparency(tmp_path):
    path = tmp_path / "pt.png"
    image = Image.new("P", (4, 4), 0)
    image.putpalette([0, 255, 0, 10, 20, 30] + [0] * (256 * 3 - 6))
    image.putpixel((1, 1), 1)
    image.info["transparency"] = 0
    image.save(path, transparency=0)
    out = pixels(load_rgb(path))
    assert tuple(out[0, 0]) == (128, 128, 128)  # the transparent green index
    assert tuple(out[1, 1]) == (10, 20, 30)


def test_cmyk_jpeg(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (20, 10), (0, 255, 255, 0)).save(path, quality=95)  # pure red in CMYK
    assert Image.open(path).mode == "CMYK"
    out = pixels(load_rgb(path))
    assert out.shape == (10, 20, 3)
    r, g, b = (int(v) for v in out[5, 10])
    assert r > 240 and g < 15 and b < 15


def test_16_bit_greyscale_png_keeps_full_range(tmp_path):
    path = tmp_path / "g16.png"
    a = np.linspace(0, 65535, 32 * 64).reshape(32, 64).round().astype(np.uint16)
    Image.fromarray(a).save(path)
    assert Image.open(path).mode.startswith("I")
    out = pixels(load_rgb(path))
    assert out.dtype == np.uint8 and out.shape == (32, 64, 3)
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 200  # a gradient, not clipped to a few values
    # Monotone along the gradient, and the channels agree.
    flat = out[..., 0].ravel()
    assert np.all(np.diff(flat.astype(int)) >= 0)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # The middle of the range lands in the middle.
    assert abs(int(out[16, 0, 0]) - 128) <= 2


def test_exif_orientation_6_rotates(tmp_path):
    path = tmp_path / "rot.jpg"
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    stored.save(path, exif=exif, quality=95)
    image = load_rgb(path)
    assert image.size == (20, 40)
    out = pixels(image).astype(int)

    def is_red(p):
        return p[0] > 200 and p[1] < 60 and p[2] < 60

    # Rotated clockwise, the stored top-left corner is displayed top-right.
    assert is_red(out[3, 16])
    assert not is_red(out[3, 3])
    assert not is_red(out[36, 3]) and not is_red(out[36, 16])


def test_exif_orientation_with_draft(tmp_path):
    path = tmp_path / "rot_big.jpg"
    stored = Image.new("RGB", (800, 400), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 200, 200))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=90)
    image = load_rgb(path, draft_size=100)
    w, h = image.size
    assert h > w and w >= 100
    out = pixels(image).astype(int)
    assert out[5, w - 5][0] > 200 and out[5, w - 5][2] < 60


def test_truncated_jpeg(tmp_path):
    full = tmp_path / "full.jpg"
    noisy_rgb(64, 64).save(full, quality=90)
    data = full.read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    load_rgb(full)  # the whole file is fine
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)
    assert "truncated" in info.value.reason


def test_garbage_bytes_with_jpg_name(tmp_path):
    path = tmp_path / "garbage.jpg"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert info.value.path == str(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(ImageLoadError):
        load_rgb(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert info.value.reason == "file not found"
    assert str(path) in str(info.value)


@pytest.mark.parametrize("limit", [1000, 6000], ids=["error_zone_over_2x", "warning_zone_1x_to_2x"])
def test_decompression_bomb_refused(tmp_path, monkeypatch, limit):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 100), (1, 2, 3)).save(path)  # 10 000 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert "decompression bomb" in info.value.reason
    assert str(path) in str(info.value)


def test_under_the_pixel_limit_loads(tmp_path, monkeypatch):
    path = tmp_path / "ok.png"
    Image.new("RGB", (100, 100), (1, 2, 3)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    assert load_rgb(path).size == (100, 100)


def test_draft_size_on_large_jpeg(tmp_path):
    path = tmp_path / "large.jpg"
    noisy_rgb(1600, 1200, seed=1).save(path, quality=85)
    image = load_rgb(path, draft_size=224)
    assert image.mode == "RGB"
    w, h = image.size
    # Decoded at a reduced scale, but never below the requested size.
    assert min(w, h) >= 224
    assert (w, h) != (1600, 1200)
    assert w * 3 == h * 4


def test_draft_size_ignored_for_png(tmp_path):
    path = tmp_path / "large.png"
    Image.new("L", (600, 300), 7).save(path)
    image = load_rgb(path, draft_size=64)
    assert image.mode == "RGB" and image.size == (600, 300)
