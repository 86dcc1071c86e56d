"""Manifests: parsing, path resolution, label matching, error reporting by file:line, round trips."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from race_classifier.data.manifest import ManifestError, Sample, format_sample, read_manifest, write_manifest
from race_classifier.labels import get_mapping, get_taxonomy

SEED5 = get_taxonomy("seed5")
FAIRFACE7 = get_taxonomy("fairface7")
MANIFEST_LOG = "race_classifier.data.manifest"


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not decoded by read_manifest")
    return path


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_paths_with_spaces(tmp_path):
    image = touch(tmp_path / "my photos" / "a b.jpg")
    manifest = write(tmp_path / "m.txt", "my photos/a b.jpg White\n")
    [sample] = read_manifest(manifest, SEED5)
    assert Path(sample.path) == image.resolve()
    assert sample.label == SEED5.index("White")
    assert sample.line == 1


def test_relative_paths_resolve_against_manifest_folder_not_cwd(tmp_path, monkeypatch):
    data = tmp_path / "data"
    image = touch(data / "img" / "x.jpg")
    manifest = write(data / "train.txt", "img/x.jpg Black\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    touch(elsewhere / "img" / "decoy.jpg")  # an 'img' folder in the cwd must not be used
    monkeypatch.chdir(elsewhere)
    [sample] = read_manifest(manifest, SEED5)
    assert Path(sample.path) == image.resolve()
    assert Path(sample.path).is_absolute()


def test_relative_manifest_path_from_another_cwd(tmp_path, monkeypatch):
    image = touch(tmp_path / "data" / "x.jpg")
    write(tmp_path / "data" / "m.txt", "x.jpg Indian\n")
    monkeypatch.chdir(tmp_path)
    [sample] = read_manifest("data/m.txt", SEED5)
    assert Path(sample.path) == image.resolve()


def test_absolute_paths(tmp_path):
    image = touch(tmp_path / "abs" / "face.png")
    (tmp_path / "sub").mkdir()
    manifest = write(tmp_path / "sub" / "m.txt", f"{image} Asian\n")
    [sample] = read_manifest(manifest, SEED5)
    assert Path(sample.path) == image
    assert sample.label == 0


def test_index_labels_and_synonyms(tmp_path):
    for name in "abcd":
        touch(tmp_path / f"{name}.jpg")
    manifest = write(tmp_path / "m.txt", "a.jpg 3\nb.jpg 0\nc.jpg Caucasian\nd.jpg latino-hispanic\n")
    samples = read_manifest(manifest, SEED5)
    assert [s.label for s in samples] == [3, 0, 3, 4]


def test_tab_separated_extras(tmp_path):
    touch(tmp_path / "with space.jpg")
    touch(tmp_path / "b.jpg")
    touch(tmp_path / "c.jpg")
    manifest = write(tmp_path / "m.txt",
                     "with space.jpg\tEast Asian\tFemale\tmore than 70\n"
                     "b.jpg\tWhite\t\t20-29\n"
                     "c.jpg\tBlack\n")
    a, b, c = read_manifest(manifest, FAIRFACE7)
    assert (a.label, a.gender, a.age) == (FAIRFACE7.index("East Asian"), "Female", "more than 70")
    assert Path(a.path).name == "with space.jpg"
    assert (b.label, b.gender, b.age) == (0, "", "20-29")
    assert (c.label, c.gender, c.age) == (1, "", "")


def test_blank_lines_and_comments_skipped(tmp_path):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    manifest = write(tmp_path / "m.txt", "# header\n\n   \na.jpg White\n  # indented comment\r\nb.jpg Black\r\n\n")
    samples = read_manifest(manifest, SEED5)
    assert [(Path(s.path).name, s.label, s.line) for s in samples] == [("a.jpg", 3, 4), ("b.jpg", 1, 6)]


@pytest.mark.parametrize("first", ["a.jpg White\n", "# header\na.jpg White\n"])
def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, first):
    """Windows editors save UTF-8 with a BOM: the first image (or comment) line must survive it."""
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "b.jpg")
    manifest = tmp_path / "m.txt"
    manifest.write_text(first + "b.jpg Black\n", encoding="utf-8-sig")
    assert manifest.read_bytes().startswith(b"\xef\xbb\xbf")
    assert [Path(s.path).name for s in read_manifest(manifest, SEED5)] == ["a.jpg", "b.jpg"]


def test_a_manifest_that_is_not_utf8_names_file_and_line(tmp_path):
    """A manifest saved as Latin-1 (an accented file name) is an error naming the file and the line, not a bare
    UnicodeDecodeError; the line is right even far past the decoder's first block."""
    touch(tmp_path / "a.jpg")
    manifest = tmp_path / "m.txt"
    manifest.write_bytes(b"a.jpg White\n" * 2000 + "caf\u00e9.jpg Black\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"m\.txt:2001: not UTF-8"):
        read_manifest(manifest, SEED5)


def test_unknown_label_names_file_and_line(tmp_path):
    touch(tmp_path / "a.jpg")
    manifest = write(tmp_path / "m.txt", "# c\na.jpg White\na.jpg Martian\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, SEED5)
    assert f"{manifest}:3" in str(info.value)
    assert "Martian" in str(info.value)


def test_out_of_range_index_names_file_and_line(tmp_path):
    touch(tmp_path / "a.jpg")
    manifest = write(tmp_path / "m.txt", "a.jpg 5\n")
    with pytest.raises(ManifestError, match=rf"{manifest}:1"):
        read_manifest(manifest, SEED5)


def test_malformed_line_names_file_and_line(tmp_path):
    touch(tmp_path / "a.jpg")
    manifest = write(tmp_path / "m.txt", "a.jpg White\n\nonly_a_path.jpg\n")
    with pytest.raises(ManifestError) as info:
        read_manifest(manifest, SEED5)
    assert f"{manifest}:3" in str(info.value)
    assert "only_a_path.jpg" in str(info.value)


def test_tab_line_without_label_is_malformed(tmp_path):
    touch(tmp_path / "a.jpg")
    manifest = write(tmp_path / "m.txt", "a.jpg\t\tMale\t30\n")
    with pytest.raises(ManifestError, match=rf"{manifest}:1"):
        read_manifest(manifest, SEED5)


def test_missing_images_skipped_with_warning(tmp_path, caplog):
    touch(tmp_path / "a.jpg")
    touch(tmp_path / "c.jpg")
    manifest = write(tmp_path / "m.txt", "a.jpg White\nmissing one.jpg Black\nc.jpg Asian\n")
    with caplog.at_level(logging.WARNING, logger=MANIFEST_LOG):
        samples = read_manifest(manifest, SEED5)
    assert [Path(s.path).name for s in samples] == ["a.jpg", "c.jpg"]
    warnings = [r for r in caplog.records if r.name == MANIFEST_LOG and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert f"{manifest}:2" in text
    assert "missing one.jpg" in text
    assert f"{manifest}:1" not in text and f"{manifest}:3" not in text


def test_missing_images_kept_without_file_check(tmp_path):
    manifest = write(tmp_path / "m.txt", "nowhere.jpg White\n")
    [sample] = read_manifest(manifest, SEED5, check_files=False)
    assert Path(sample.path) == (tmp_path / "nowhere.jpg").resolve()


def test_all_missing_is_an_error(tmp_path):
    manifest = write(tmp_path / "m.txt", "x.jpg White\ny.jpg Black\n")
    with pytest.raises(ManifestError, match="no usable images"):
        read_manifest(manifest, SEED5)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_manifest_is_an_error(tmp_path, text):
    manifest = write(tmp_path / "m.txt", text)
    with pytest.raises(ManifestError, match="no usable images"):
        read_manifest(manifest, SEED5)


def test_missing_manifest_is_an_error(tmp_path):
    with pytest.raises(ManifestError, match="not found"):
        read_manifest(tmp_path / "absent.txt", SEED5)


def test_mapping_applied_and_dropped_classes_left_out(tmp_path):
    race4 = get_taxonomy("race4")
    mapping = get_mapping(FAIRFACE7, race4)
    rows = [("w.jpg", "White"), ("l.jpg", "Latino_Hispanic"), ("e.jpg", "East Asian"),
            ("s.jpg", "Southeast_Asian"), ("m.jpg", "Middle Eastern"), ("h.jpg", "Hispanic")]
    for name, _ in rows:
        touch(tmp_path / name)
    manifest = write(tmp_path / "m.txt", "".join(f"{n} {lab}\n" if " " not in lab else f"{n}\t{lab}\n"
                                                 for n, lab in rows))
    samples = read_manifest(manifest, race4, mapping=mapping)
    assert [(Path(s.path).name, race4.classes[s.label]) for s in samples] == [
        ("w.jpg", "White"), ("e.jpg", "Asian"), ("s.jpg", "Asian"), ("m.jpg", "White")]


def test_mapping_matches_labels_in_the_source_taxonomy(tmp_path):
    # 'Asian' is a seed5 class but not a fairface7 one: with a fairface7 mapping it is unknown.
    touch(tmp_path / "a.jpg")
    manifest = write(tmp_path / "m.txt", "a.jpg Asian\n")
    with pytest.raises(ManifestError, match=rf"{manifest}:1"):
        read_manifest(manifest, SEED5, mapping=get_mapping(FAIRFACE7, SEED5))


def test_write_then_read_round_trip(tmp_path):
    images = [touch(tmp_path / "imgs" / name) for name in ("a b.jpg", "c.jpg", "d.jpg")]
    rows = [(str(images[0]), "East Asian", "Female", "more than 70"),
            ("imgs/c.jpg", "Middle Eastern", "", ""),
            ("imgs/d.jpg", "Latino_Hispanic", "Male", "3-9")]
    manifest = tmp_path / "m.txt"
    write_manifest(manifest, rows)
    samples = read_manifest(manifest, FAIRFACE7)
    assert samples == [
        Sample(str(images[0]), FAIRFACE7.index("East Asian"), "Female", "more than 70", 2),
        Sample(str(images[1].resolve()), FAIRFACE7.index("Middle Eastern"), "", "", 3),
        Sample(str(images[2].resolve()), FAIRFACE7.index("Latino_Hispanic"), "Male", "3-9", 4),
    ]


@pytest.mark.parametrize("row", [("a\tb.jpg", "White", "", ""), ("a.jpg", "Wh\tite", "", ""),
                                 ("a.jpg", "White", "Fe\tmale", ""), ("a.jpg", "White", "", "20\n29")])
def test_write_refuses_tabs_and_newlines(tmp_path, row):
    path = tmp_path / "m.txt"
    with pytest.raises(ManifestError, match="tab or newline"):
        write_manifest(path, [("ok.jpg", "Black", "", ""), row])
    assert not path.exists()  # nothing half-written


def test_format_sample():
    assert format_sample("x y.jpg", "White") == "x y.jpg\tWhite\t\t\n"
