"""Label taxonomies: normalisation, synonyms, index labels, built-ins, user-defined taxonomies, mappings."""
from __future__ import annotations

import pytest

from race_classifier.labels import (
    Taxonomy,
    UnknownLabelError,
    builtin_taxonomies,
    get_mapping,
    get_taxonomy,
    load_label_map,
    normalize_label,
    class_file_text,
)

SEED5 = get_taxonomy("seed5")
FAIRFACE7 = get_taxonomy("fairface7")
RACE4 = get_taxonomy("race4")


# --- normalisation and synonyms ------------------------------------------------------------------

@pytest.mark.parametrize("spelling", ["latino hispanic", "Latino_Hispanic", "Latino/Hispanic",
                                      "LATINO-HISPANIC", "  latino   hispanic  ", "latino__hispanic"])
def test_spellings_of_latino_hispanic_match_the_class(spelling):
    assert SEED5.canonical(spelling) == "Latino_Hispanic"
    assert SEED5.index(spelling) == 4


def test_normalize_label_ignores_case_and_separators():
    assert normalize_label("East_Asian") == normalize_label("east asian") == normalize_label("EAST-ASIAN") == "east asian"
    assert normalize_label("Middle Eastern") != normalize_label("East Asian")


@pytest.mark.parametrize("synonym, canonical", [
    ("Caucasian", "White"),
    ("caucasian", "White"),
    ("African-American", "Black"),
    ("African American", "Black"),
    ("Afro-American", "Black"),
    ("Hispanic", "Latino_Hispanic"),
    ("Latino", "Latino_Hispanic"),
    ("Hispanic or Latino", "Latino_Hispanic"),
    ("latino or hispanic", "Latino_Hispanic"),
])
def test_synonyms_map_to_the_canonical_class(synonym, canonical):
    assert SEED5.canonical(synonym) == canonical


def test_synonym_applies_only_where_its_class_exists():
    # race4 has no Latino_Hispanic, so 'Hispanic' must not match anything there.
    with pytest.raises(UnknownLabelError):
        RACE4.index("Hispanic")
    # 'Other' is a synonym of utkface5's 'Others', but not of anything in seed5.
    assert get_taxonomy("utkface5").canonical("other") == "Others"
    with pytest.raises(UnknownLabelError):
        SEED5.index("other")


# --- index labels and unknown labels -------------------------------------------------------------

def test_index_labels():
    assert SEED5.index("3") == 3
    assert SEED5.canonical("3") == "White"
    assert SEED5.index(" 0 ") == 0
    assert SEED5.index(4) == 4
    assert FAIRFACE7.canonical("6") == "Middle Eastern"


@pytest.mark.parametrize("label", ["5", 5, "99", -1, "-1"])
def test_out_of_range_index_is_unknown(label):
    with pytest.raises(UnknownLabelError):
        SEED5.index(label)


def test_unknown_label_message_names_label_and_taxonomy():
    with pytest.raises(UnknownLabelError) as info:
        SEED5.index("Martian")
    message = str(info.value)
    assert "Martian" in message
    assert "seed5" in message
    assert isinstance(info.value, ValueError)


def test_out_of_range_message_names_taxonomy():
    with pytest.raises(UnknownLabelError, match=r"7.*fairface7"):
        FAIRFACE7.index("7")


# --- built-in taxonomies -------------------------------------------------------------------------

@pytest.mark.parametrize("name, classes", [
    ("seed5", ["Asian", "Black", "Indian", "White", "Latino_Hispanic"]),
    ("fairface7", ["White", "Black", "Latino_Hispanic", "East Asian", "Southeast Asian", "Indian",
                   "Middle Eastern"]),
    ("race4", ["White", "Black", "Asian", "Indian"]),
    ("utkface5", ["White", "Black", "Asian", "Indian", "Others"]),
])
def test_builtin_taxonomies(name, classes):
    taxonomy = get_taxonomy(name)
    assert taxonomy.name == name
    assert list(taxonomy.classes) == classes
    assert taxonomy.num_classes == len(classes)
    assert builtin_taxonomies()[name] == classes
    for i, c in enumerate(classes):
        assert taxonomy.index(c) == i


def test_unknown_taxonomy_name_raises():
    with pytest.raises(ValueError, match="no_such_taxonomy"):
        get_taxonomy("no_such_taxonomy")


def test_taxonomy_dict_round_trip():
    again = Taxonomy.from_dict(FAIRFACE7.to_dict())
    assert again == FAIRFACE7
    assert again.index("east asian") == 3


# --- user-defined taxonomies ---------------------------------------------------------------------

def test_user_taxonomy_from_list():
    taxonomy = get_taxonomy(["Red", " Green ", "Blue"])
    assert taxonomy.classes == ("Red", "Green", "Blue")
    assert taxonomy.index("green") == 1
    with pytest.raises(UnknownLabelError):
        taxonomy.index("White")


def test_user_taxonomy_from_comma_string():
    taxonomy = get_taxonomy("Red, Green,Blue,")
    assert taxonomy.classes == ("Red", "Green", "Blue")
    assert taxonomy.index("BLUE") == 2


def test_user_taxonomy_from_plain_class_file(tmp_path):
    path = tmp_path / "colours.txt"
    path.write_text("Red\n\n# a comment\nGreen\n  Blue  \n", encoding="utf-8")
    taxonomy = get_taxonomy(str(path))
    assert taxonomy.name == "colours"
    assert taxonomy.classes == ("Red", "Green", "Blue")


def test_class_file_text_keeps_the_taxonomy_name(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text(class_file_text(FAIRFACE7), encoding="utf-8")
    assert path.read_text(encoding="utf-8").splitlines()[0] == "# taxonomy: fairface7"
    again = get_taxonomy(str(path))
    assert again.name == "fairface7"
    assert again.classes == FAIRFACE7.classes
    # The name is what selects the built-in mapping.
    assert get_mapping(again, SEED5)(again.index("East Asian")) == SEED5.index("Asian")


@pytest.mark.parametrize("classes", [
    ["Latino_Hispanic", "latino hispanic"],
    ["White", "WHITE"],
    ["East Asian", "East_Asian", "Black"],
    ["Latino/Hispanic", "Latino-Hispanic"],
])
def test_duplicate_classes_after_normalisation_rejected(classes):
    with pytest.raises(ValueError, match="same label"):
        get_taxonomy(classes)


def test_empty_class_names_rejected():
    with pytest.raises(ValueError):
        get_taxonomy(["Red", "  ", "Blue"])
    with pytest.raises(ValueError):
        Taxonomy("empty", ())


# --- mappings ------------------------------------------------------------------------------------

def _mapping_by_name(mapping):
    return {s: (None if t is None else mapping.target.classes[t])
            for s, t in zip(mapping.source.classes, mapping.table)}


def test_fairface7_to_seed5():
    mapping = get_mapping(FAIRFACE7, SEED5)
    assert _mapping_by_name(mapping) == {
        "White": "White", "Black": "Black", "Latino_Hispanic": "Latino_Hispanic",
        "East Asian": "Asian", "Southeast Asian": "Asian", "Indian": "Indian", "Middle Eastern": "White",
    }
    assert mapping.map_label("southeast_asian") == SEED5.index("Asian")
    assert mapping.map_label("6") == SEED5.index("White")
    assert "Middle Eastern -> White" in mapping.describe()
    assert not any(line.startswith("Black ") for line in mapping.describe())


def test_fairface7_to_race4_drops_latino_hispanic():
    mapping = get_mapping(FAIRFACE7, RACE4)
    by_name = _mapping_by_name(mapping)
    assert by_name["Latino_Hispanic"] is None
    assert mapping.map_label("Hispanic") is None
    assert by_name["East Asian"] == by_name["Southeast Asian"] == "Asian"
    assert by_name["Middle Eastern"] == "White"
    assert by_name["Indian"] == "Indian"
    assert "Latino_Hispanic -> (dropped)" in mapping.describe()


def test_override_drops_a_class():
    mapping = get_mapping(FAIRFACE7, SEED5, overrides={"Middle Eastern": None})
    by_name = _mapping_by_name(mapping)
    assert by_name["Middle Eastern"] is None
    assert by_name["East Asian"] == "Asian"  # the rest of the built-in table still applies


def test_override_remaps_a_class():
    mapping = get_mapping(FAIRFACE7, SEED5, overrides={"middle_eastern": "Indian", "Black": "drop"})
    by_name = _mapping_by_name(mapping)
    assert by_name["Middle Eastern"] == "Indian"
    assert by_name["Black"] is None
    assert by_name["White"] == "White"


def test_identity_mapping_between_same_taxonomy():
    mapping = get_mapping(SEED5, SEED5)
    assert mapping.table == tuple(range(5))
    assert mapping.describe() == []


def test_missing_counterpart_names_the_class():
    with pytest.raises(UnknownLabelError) as info:
        get_mapping(SEED5, FAIRFACE7)
    message = str(info.value)
    assert "'Asian'" in message
    assert "seed5" in message and "fairface7" in message


def test_override_fixes_missing_counterpart():
    mapping = get_mapping(SEED5, FAIRFACE7, overrides={"Asian": "East Asian"})
    assert mapping.map_label("Asian") == FAIRFACE7.index("East Asian")
    assert mapping.map_label("Latino") == FAIRFACE7.index("Latino_Hispanic")


def test_override_to_unknown_target_class_raises():
    with pytest.raises(UnknownLabelError, match="Martian"):
        get_mapping(FAIRFACE7, SEED5, overrides={"Middle Eastern": "Martian"})


def test_load_label_map(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("Asian: East Asian\nLatino_Hispanic: null\n", encoding="utf-8")
    overrides = load_label_map(path)
    assert overrides == {"Asian": "East Asian", "Latino_Hispanic": None}
    mapping = get_mapping(SEED5, FAIRFACE7, overrides)
    by_name = _mapping_by_name(mapping)
    assert by_name["Asian"] == "East Asian"
    assert by_name["Latino_Hispanic"] is None
    assert by_name["White"] == "White"


def test_load_label_map_rejects_a_list(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("- Asian\n- White\n", encoding="utf-8")
    with pytest.raises(ValueError, match="mapping"):
        load_label_map(path)


def test_empty_label_map_is_empty(tmp_path):
    path = tmp_path / "map.yaml"
    path.write_text("", encoding="utf-8")
    assert load_label_map(path) == {}
