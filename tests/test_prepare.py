"""``race-classifier prepare`` on small real inputs: folder trees, FairFace CSVs and UTKFace names."""
from __future__ import annotations

import argparse
import io
import logging
from pathlib import Path

import pytest
from PIL import Image

from race_classifier.data import prepare as P
from race_classifier.data import split as SP
from race_classifier.data.options import add_prepare_arguments
from race_classifier.data import sources as S
from race_classifier.data.manifest import read_manifest
from race_classifier.labels import get_taxonomy

SEED5 = get_taxonomy("seed5")
PREP_LOG = "race_classifier.data.prepare"
SOURCES_LOG = "race_classifier.data.sources"


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 80, 40)).save(buffer, format="JPEG")
    return buffer.getvalue()


JPEG = _jpeg_bytes()


def write_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(JPEG)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="race-classifier prepare")
    add_prepare_arguments(parser)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------- folder tree

FOLDER_TO_SEED5 = {"Afro-American": "Black", "Caucasian": "White", "Latino Hispanic": "Latino_Hispanic",
                   "Asian": "Asian", "Indian": "Indian"}


@pytest.fixture
def tree(tmp_path) -> Path:
    """5 race folders (spelled as other datasets do) x 4 identities x 3 images; mixed-case extensions."""
    root = tmp_path / "tree"
    for race in FOLDER_TO_SEED5:
        for person in range(4):
            for k, ext in enumerate((".jpg", ".JPEG", ".png")):
                write_image(root / race / f"person{person}" / f"img{k}{ext}")
    (root / "Asian" / "person0" / "notes.txt").write_text("not an image")
    return root


def identity_of(path: str) -> str:
    """<race>/<identity> of a folder-tree image path."""
    parts = Path(path).parts
    return f"{parts[-3]}/{parts[-2]}"


def test_folder_tree_synonyms_map_to_seed5(tree, tmp_path):
    records = S.scan_folder_tree(tree, SEED5)
    assert len(records) == 60
    assert {r.label for r in records} == set(FOLDER_TO_SEED5)
    assert all(Path(r.path).is_absolute() for r in records)

    summary = P.prepare(records, tmp_path / "out", "seed5", "seed5", val_fraction=0.25, seed=0)
    samples = read_manifest(tmp_path / "out" / "train.txt", SEED5) + read_manifest(tmp_path / "out" / "val.txt", SEED5)
    assert len(samples) == 60
    for sample in samples:
        folder = Path(sample.path).parts[-3]
        assert SEED5.classes[sample.label] == FOLDER_TO_SEED5[folder]
    assert summary["train"] + summary["val"] == 60
    assert {cls: n["train"] + n["val"] for cls, n in summary["counts"].items()} == {c: 12 for c in SEED5.classes}
    assert (tmp_path / "out" / "classes.txt").read_text().splitlines()[1:] == list(SEED5.classes)


def test_split_keeps_identities_apart_and_is_stratified(tree, tmp_path):
    records = S.scan_folder_tree(tree)
    train, val = SP.split_by_identity(records, val_fraction=0.25, seed=3)
    assert len(train) + len(val) == len(records)
    assert not {r.identity for r in train} & {r.identity for r in val}
    assert {r.label for r in val} == set(FOLDER_TO_SEED5)

    P.prepare(records, tmp_path / "out", "seed5", "seed5", val_fraction=0.25, seed=3)
    train_ids = {identity_of(s.path) for s in read_manifest(tmp_path / "out" / "train.txt", SEED5)}
    val_samples = read_manifest(tmp_path / "out" / "val.txt", SEED5)
    assert not train_ids & {identity_of(s.path) for s in val_samples}
    assert {s.label for s in val_samples} == set(range(SEED5.num_classes))


def test_same_seed_same_files_other_seed_other_split(tree, tmp_path):
    def val_text(seed: int, name: str) -> str:
        P.prepare(S.scan_folder_tree(tree), tmp_path / name, "seed5", "seed5", val_fraction=0.25, seed=seed)
        return (tmp_path / name / "val.txt").read_text()

    first = val_text(0, "a")
    assert val_text(0, "b") == first
    assert (tmp_path / "a" / "train.txt").read_text() == (tmp_path / "b" / "train.txt").read_text()
    assert any(val_text(seed, f"s{seed}") != first for seed in (1, 2, 3))


def test_a_failed_write_leaves_the_previous_set_whole(tree, tmp_path, monkeypatch):
    """A full disk while writing classes.txt (the last of the three) must not leave a new train.txt and
    val.txt beside the old classes.txt: the folder keeps its previous set, and no temporary file."""
    import errno
    import os
    out = tmp_path / "out"
    P.prepare(S.scan_folder_tree(tree), out, "seed5", "seed5", val_fraction=0.25, seed=0)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    real_fsync, calls = os.fsync, []

    def fsync_until_disk_full(fd):
        calls.append(fd)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync_until_disk_full)
    with pytest.raises(OSError, match="No space left"):
        P.prepare(S.scan_folder_tree(tree), out, "seed5", "seed5", val_fraction=0.25, seed=1)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    monkeypatch.setattr(os, "fsync", real_fsync)
    P.prepare(S.scan_folder_tree(tree), out, "seed5", "seed5", val_fraction=0.25, seed=1)
    assert (out / "val.txt").read_bytes() != before["val.txt"]  # the other seed's split, written whole


def test_a_file_name_that_is_not_utf8_is_an_error_naming_it(tree, tmp_path):
    """A Latin-1 file name (os gives it with surrogates) cannot go into a UTF-8 manifest: the error names the
    file, rather than a bare UnicodeEncodeError naming nothing."""
    import os
    bad = os.path.join(os.fsencode(tree / "Caucasian" / "person1"), b"caf\xe9.jpg")
    with open(bad, "wb") as f:
        f.write(JPEG)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"not UTF-8.*person1/caf\\udce9\.jpg"):
        P.run(parse(["folder", str(tree), "--out", str(out)]))


def test_unknown_folder_is_an_error_naming_it(tree):
    write_image(tree / "Martian" / "p1" / "a.jpg")
    with pytest.raises(S.PrepareError, match="Martian"):
        S.scan_folder_tree(tree, SEED5)


def test_images_without_identity_folder_are_their_own_identities(tree, caplog):
    write_image(tree / "Indian" / "loose1.jpg")
    write_image(tree / "Indian" / "loose2.jpg")
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        records = S.scan_folder_tree(tree, SEED5)
    loose = [r for r in records if r.path.endswith(("loose1.jpg", "loose2.jpg"))]
    assert {r.identity for r in loose} == {"Indian/loose1.jpg", "Indian/loose2.jpg"}
    assert S.count_loose_images(records) == 2
    assert "own identity" in caplog.text


def test_empty_or_missing_folder_tree_is_an_error(tmp_path):
    with pytest.raises(S.PrepareError, match="not found"):
        S.scan_folder_tree(tmp_path / "nowhere")
    (tmp_path / "empty" / "White").mkdir(parents=True)
    with pytest.raises(S.PrepareError, match="no images"):
        S.scan_folder_tree(tmp_path / "empty")


@pytest.mark.parametrize("fraction", [0, -0.1, 0.6, 1.0])
def test_val_fraction_out_of_range_is_an_error(tree, tmp_path, fraction):
    with pytest.raises(P.PrepareError, match="val_fraction"):
        P.prepare(S.scan_folder_tree(tree), tmp_path / "out", "seed5", val_fraction=fraction)


def test_a_val_fraction_that_is_not_one_fold_is_warned_with_the_share_held_out(caplog):
    assert SP.check_val_fraction(0.1) == 10 and "holds out" not in caplog.text
    assert SP.check_val_fraction(0.4) == 2
    assert "val_fraction 0.4 holds out one of 2 stratified folds: about 50.0% of the identities" in caplog.text


def test_too_few_identities_for_the_split_is_an_error(tmp_path):
    write_image(tmp_path / "tree" / "White" / "p1" / "a.jpg")
    write_image(tmp_path / "tree" / "Black" / "p2" / "a.jpg")
    with pytest.raises(P.PrepareError, match="only 2 identities"):
        SP.split_by_identity(S.scan_folder_tree(tmp_path / "tree"), val_fraction=0.1, seed=0)


def test_class_without_validation_images_is_named(tree, tmp_path, caplog):
    records = S.scan_folder_tree(tree)
    val = [r for r in records if r.identity.endswith("person0") and r.label != "Indian"]
    train = [r for r in records if not r.identity.endswith("person0")]
    with caplog.at_level(logging.WARNING, logger=PREP_LOG):
        summary = P.prepare(train, tmp_path / "out", "seed5", val_records=val)
    assert summary["validation"] == "given" and summary["counts"]["Indian"] == {"train": 9, "val": 0}
    assert "class 'Indian' has no validation images" in caplog.text


# ------------------------------------------------------------------------------------------ FairFace

FAIRFACE_HEADER = "file,age,gender,race,service_test\n"
FAIRFACE_RACES = ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian", "Middle Eastern"]


def write_fairface(folder: Path, rows: list[tuple[str, str, str, str]], name: str = "labels.csv",
                   missing: tuple[str, ...] = ()) -> Path:
    """A FairFace-style CSV in ``folder`` and its images (except those named in ``missing``)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [FAIRFACE_HEADER] + [f"{file},{age},{gender},{race},TRUE\n" for file, age, gender, race in rows]
    for file, *_ in rows:
        if file not in missing:
            write_image(folder / file)
    csv_path = folder / name
    csv_path.write_text("".join(lines))
    return csv_path


def fairface_rows(prefix: str = "train", per_race: int = 4) -> list[tuple[str, str, str, str]]:
    ages = ["20-29", "3-9", "more than 70", "0-2"]
    return [(f"{prefix}/{race.replace(' ', '_')}{i}.jpg", ages[i % len(ages)], ("Male", "Female")[i % 2], race)
            for race in FAIRFACE_RACES for i in range(per_race)]


def test_fairface_mangled_ages_are_fixed_and_reported(tmp_path, caplog):
    rows = fairface_rows()
    mangled = {0: "9-Mar", 1: "03-Sep", 2: "19-Oct", 3: "Oct-19", 4: "Mar-09", 5: "Sep-03"}
    for i, age in mangled.items():
        rows[i] = (*rows[i][:1], age, *rows[i][2:])
    csv_path = write_fairface(tmp_path / "ff", rows)

    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        records, report = S.read_fairface_csv(csv_path)
    assert [r.age for r in records[:6]] == ["3-9", "3-9", "10-19", "10-19", "3-9", "3-9"]
    assert report["fixed_age_count"] == 6
    assert report["fixed_ages"]["19-Oct"] == "10-19" and report["fixed_ages"]["9-Mar"] == "3-9"
    assert "fixed 6 age value(s)" in caplog.text
    assert "'Oct-19' -> '10-19'" in caplog.text and "'03-Sep' -> '3-9'" in caplog.text


@pytest.mark.parametrize("value, fixed", [("9-Mar", "3-9"), ("03-Sep", "3-9"), ("Mar-09", "3-9"), ("Sep-03", "3-9"),
                                          ("19-Oct", "10-19"), ("Oct-19", "10-19"), ("oct-19", "10-19"),
                                          ("20-29", None), ("5-Mar", None), ("Foo-19", None), ("", None)])
def test_fix_spreadsheet_age(value, fixed):
    assert S.fix_spreadsheet_age(value) == fixed


def test_fairface7_maps_to_seed5(tmp_path):
    records, _ = S.read_fairface_csv(write_fairface(tmp_path / "ff", fairface_rows()))
    assert all(r.identity == Path(r.path).relative_to(tmp_path / "ff").as_posix() for r in records)
    summary = P.prepare(records, tmp_path / "out", "fairface7", "seed5", val_fraction=0.25, seed=0)
    totals = {cls: n["train"] + n["val"] for cls, n in summary["counts"].items()}
    assert totals == {"Asian": 8, "Black": 4, "Indian": 4, "White": 8, "Latino_Hispanic": 4}
    assert summary["dropped"] == {}
    samples = read_manifest(tmp_path / "out" / "train.txt", SEED5) + read_manifest(tmp_path / "out" / "val.txt", SEED5)
    by_file = {Path(s.path).name: s for s in samples}
    assert SEED5.classes[by_file["Southeast_Asian0.jpg"].label] == "Asian"
    assert SEED5.classes[by_file["Middle_Eastern1.jpg"].label] == "White"
    assert (by_file["Middle_Eastern1.jpg"].gender, by_file["Middle_Eastern1.jpg"].age) == ("Female", "3-9")


def test_label_map_drops_a_class(tmp_path):
    csv_path = write_fairface(tmp_path / "ff", fairface_rows())
    label_map = tmp_path / "map.yaml"
    label_map.write_text("Middle Eastern: null\n")
    out = tmp_path / "out"
    assert P.run(parse(["fairface", str(csv_path), "--out", str(out), "--label_map", str(label_map),
                        "--val_fraction", "0.25"])) == 0
    samples = read_manifest(out / "train.txt", SEED5) + read_manifest(out / "val.txt", SEED5)
    assert len(samples) == 24
    assert not any("Middle_Eastern" in s.path for s in samples)


def test_label_map_naming_an_unknown_class_is_an_error(tmp_path):
    csv_path = write_fairface(tmp_path / "ff", fairface_rows())
    label_map = tmp_path / "map.yaml"
    label_map.write_text("Martian: null\n")
    with pytest.raises(P.PrepareError, match="map.yaml.*Martian"):
        P.run(parse(["fairface", str(csv_path), "--out", str(tmp_path / "out"), "--label_map", str(label_map)]))


def test_fairface_unknown_race_names_the_line(tmp_path):
    rows = fairface_rows()
    rows[2] = (rows[2][0], rows[2][1], rows[2][2], "Martian")
    csv_path = write_fairface(tmp_path / "ff", rows)
    with pytest.raises(S.PrepareError, match=r"labels\.csv:4: race 'Martian'"):
        S.read_fairface_csv(csv_path)


def test_fairface_unrecognised_age_names_the_line(tmp_path):
    rows = fairface_rows()
    rows[0] = (rows[0][0], "about 40", rows[0][2], rows[0][3])
    with pytest.raises(S.PrepareError, match=r"labels\.csv:2: unrecognised age 'about 40'"):
        S.read_fairface_csv(write_fairface(tmp_path / "ff", rows))


def test_fairface_missing_image_is_skipped_with_a_warning(tmp_path, caplog):
    rows = fairface_rows()
    csv_path = write_fairface(tmp_path / "ff", rows, missing=(rows[1][0],))
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        records, report = S.read_fairface_csv(csv_path)
    assert len(records) == len(rows) - 1
    assert len(report["missing"]) == 1
    assert f"labels.csv:3: {tmp_path / 'ff' / rows[1][0]}" in caplog.text


def test_fairface_csv_that_is_not_utf8_names_the_line(tmp_path):
    """A spreadsheet's cp1252 export is an error naming the file and line, not a bare UnicodeDecodeError."""
    csv_path = write_fairface(tmp_path / "ff", fairface_rows())
    lines = csv_path.read_text().splitlines(keepends=True)
    lines[3] = lines[3].replace(".jpg", "\u00e9.jpg")
    csv_path.write_bytes("".join(lines).encode("cp1252"))
    with pytest.raises(S.PrepareError, match=r"labels\.csv:4: not UTF-8"):
        S.read_fairface_csv(csv_path)


def test_fairface_csv_with_a_quote_left_open_names_the_line(tmp_path):
    """An open quote makes the rest of a FairFace-sized CSV one field, past csv's limit: a PrepareError naming
    the line the row starts on, not a bare csv.Error."""
    rows = fairface_rows(per_race=700)
    csv_path = write_fairface(tmp_path / "ff", rows)
    lines = csv_path.read_text().splitlines(keepends=True)
    lines[4] = '"' + lines[4]
    csv_path.write_text("".join(lines))
    with pytest.raises(S.PrepareError, match=r"labels\.csv:5: malformed CSV"):
        S.read_fairface_csv(csv_path)


def test_fairface_csv_without_required_columns_is_an_error(tmp_path):
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("file,gender\ntrain/1.jpg,Male\n")
    with pytest.raises(S.PrepareError, match=r"labels\.csv:1: missing required column\(s\) age, race"):
        S.read_fairface_csv(csv_path)


def test_fairface_folder_uses_its_validation_csv(tmp_path, capsys):
    folder = tmp_path / "fairface"
    write_fairface(folder, fairface_rows("train"), name="fairface_label_train.csv")
    write_fairface(folder, fairface_rows("val", per_race=1), name="fairface_label_val.csv")
    out = tmp_path / "out"
    assert P.run(parse(["fairface", str(folder), "--out", str(out)])) == 0
    val = read_manifest(out / "val.txt", SEED5)
    assert len(val) == 7 and all("/val/" in s.path for s in val)
    assert len(read_manifest(out / "train.txt", SEED5)) == 28
    assert "given validation set" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- UTKFace

UTK_VALID = ["25_0_0_20170116174525125.jpg.chip.jpg", "31_1_1_20170116174525126.jpg.chip.jpg",
             "4_0_2_20170116174525127.jpg.chip.jpg", "60_1_3_20170116174525128.jpg.chip.jpg",
             "45_0_4_20170116174525129.jpg.chip.jpg"]
UTK_MALFORMED = ["39_1_20170116174525130.jpg.chip.jpg",  # race missing
                 "x_0_1_20170116174525131.jpg.chip.jpg",  # age not a number
                 "30_2_1_20170116174525132.jpg.chip.jpg",  # gender out of range
                 "30_0_7_20170116174525133.jpg.chip.jpg"]  # race out of range


@pytest.fixture
def utk(tmp_path) -> Path:
    folder = tmp_path / "utk"
    for i in range(4):  # enough of each kept class for a 2-fold split
        for name in UTK_VALID:
            write_image(folder / f"part{i}" / name)
    for name in UTK_MALFORMED:
        write_image(folder / name)
    return folder


def test_utkface_names_parsed_and_malformed_skipped(utk, caplog):
    with caplog.at_level(logging.WARNING, logger=SOURCES_LOG):
        records, problems = S.scan_utkface(utk)
    assert len(records) == 20 and len(problems) == 4
    for name in UTK_MALFORMED:
        assert name in caplog.text
    first = next(r for r in records if r.path.endswith("part0/" + UTK_VALID[1]))
    assert (first.label, first.gender, first.age, first.identity) == ("Black", "Female", "31", "part0/" + UTK_VALID[1])


def test_utkface_others_dropped_for_seed5(utk, tmp_path, capsys):
    out = tmp_path / "out"
    assert P.run(parse(["utkface", str(utk), "--out", str(out), "--val_fraction", "0.5"])) == 0
    printed = capsys.readouterr().out
    assert "dropped: Others 4" in printed and "4 malformed" in printed
    samples = read_manifest(out / "train.txt", SEED5) + read_manifest(out / "val.txt", SEED5)
    assert len(samples) == 16
    by_name = {Path(s.path).name: s for s in samples}
    indian = by_name[UTK_VALID[3]]
    assert (SEED5.classes[indian.label], indian.gender, indian.age) == ("Indian", "Female", "60")
    assert UTK_VALID[4] not in by_name


# ----------------------------------------------------------------------------------------------- CLI

def test_cli_folder_writes_files_and_prints_summary(tree, tmp_path, capsys):
    out = tmp_path / "out"
    args = parse(["folder", str(tree), "--out", str(out), "--val_fraction", "0.25", "--seed", "1"])
    assert (args.taxonomy, args.source_taxonomy, args.label_map, args.val_csv) == ("seed5", None, None, None)
    assert P.run(args) == 0
    for name in ("train.txt", "val.txt", "classes.txt"):
        assert (out / name).is_file()
    printed = capsys.readouterr().out
    assert "Latino_Hispanic" in printed and "total" in printed


def test_cli_folder_into_a_smaller_taxonomy(tree, tmp_path, capsys):
    out = tmp_path / "out"
    assert P.run(parse(["folder", str(tree), "--out", str(out), "--taxonomy", "race4",
                        "--source_taxonomy", "seed5", "--val_fraction", "0.25"])) == 0
    race4 = get_taxonomy("race4")
    samples = read_manifest(out / "train.txt", race4) + read_manifest(out / "val.txt", race4)
    assert len(samples) == 48  # Latino_Hispanic dropped by the built-in seed5->race4 mapping
    assert "dropped: Latino_Hispanic 12" in capsys.readouterr().out


def test_cli_missing_source_is_an_error(tmp_path):
    with pytest.raises(P.PrepareError, match="SOURCE not found"):
        P.run(parse(["utkface", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]))


def test_cli_rejects_options_of_other_kinds(utk, tmp_path):
    with pytest.raises(P.PrepareError, match="--val_csv"):
        P.run(parse(["utkface", str(utk), "--out", str(tmp_path / "out"), "--val_csv", "x.csv"]))
    with pytest.raises(P.PrepareError, match="--source_taxonomy"):
        P.run(parse(["utkface", str(utk), "--out", str(tmp_path / "out"), "--source_taxonomy", "seed5"]))


# ----------------------------------------------------------------------------------------- real data

def test_same_seed_holds_out_the_same_images_in_every_taxonomy(tmp_path):
    """Models trained in fairface7 and in seed5 can then be compared on the same faces."""
    csv_path = write_fairface(tmp_path / "ff", fairface_rows(per_race=8))
    label_map = tmp_path / "map.yaml"
    label_map.write_text("Middle Eastern: null\n")
    val_files = {}
    for name, extra in (("fairface7", ["--taxonomy", "fairface7"]), ("seed5", []),
                        ("seed5_no_me", ["--label_map", str(label_map)])):
        out = tmp_path / name
        assert P.run(parse(["fairface", str(csv_path), "--out", str(out), "--val_fraction", "0.25",
                            "--seed", "5", *extra])) == 0
        val_files[name] = {line.split("\t")[0] for line in (out / "val.txt").read_text().splitlines()[1:]}
    assert len(val_files["fairface7"]) == 14  # a quarter of each of the 7 classes' 8 images
    assert val_files["seed5"] == val_files["fairface7"]
    # A class the mapping drops leaves the rest of the hold-out as it was.
    assert val_files["seed5_no_me"] == {f for f in val_files["fairface7"] if "Middle_Eastern" not in f}


FAIRFACE_SHARED_COUNTS = {"White": 6623, "Latino_Hispanic": 5400, "Indian": 5028, "Black": 5002,
                          "East Asian": 4881, "Southeast Asian": 4339, "Middle Eastern": 3727}


@pytest.mark.shared("data/fairface/fairface_label_train.csv")
def test_prepare_shared_fairface(shared_dir, tmp_path):
    out = tmp_path / "out"
    assert P.run(parse(["fairface", str(shared_dir / "data" / "fairface"), "--out", str(out)])) == 0
    train, val = read_manifest(out / "train.txt", SEED5), read_manifest(out / "val.txt", SEED5)
    assert len(train) + len(val) == 35_000
    assert abs(len(val) / 35_000 - 0.10) < 0.005
    counts = {cls: 0 for cls in SEED5.classes}
    for sample in train + val:
        counts[SEED5.classes[sample.label]] += 1
    ff = FAIRFACE_SHARED_COUNTS
    assert counts == {"Asian": ff["East Asian"] + ff["Southeast Asian"], "Black": ff["Black"], "Indian": ff["Indian"],
                      "White": ff["White"] + ff["Middle Eastern"], "Latino_Hispanic": ff["Latino_Hispanic"]}
    assert all(s.gender in ("Male", "Female") and s.age for s in val)
