"""The ``race-classifier`` command line as a newcomer reads it: every option says what it does."""
from __future__ import annotations

import argparse

import pytest

from race_classifier.cli import build_parser


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_option_of_every_subcommand_has_help():
    missing = []
    for name, sub in _subcommands(build_parser()).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
                continue  # -h/--help, and hidden aliases of documented flags
            flag = action.option_strings[0] if action.option_strings else action.dest
            if not (action.help or "").strip():
                missing.append(f"{name} {flag}")
    assert not missing, "options without help text: " + ", ".join(missing)


def test_every_subcommand_is_walked():
    assert {"train", "prepare", "calibrate", "rebalance", "evaluate", "compare", "export", "predict", "serve",
            "synth"} <= set(_subcommands(build_parser()))


def test_top_level_help_is_plain_text(capsys):
    parser = build_parser()
    assert "``" not in (parser.description or "")
    parser.print_help()
    out = capsys.readouterr().out
    assert "race-classifier command" in out and "``" not in out


def test_one_flag_style_with_the_old_spellings_as_hidden_aliases(capsys):
    """--model_path and underscores everywhere; --model and dashed spellings still parse, and --help hides them."""
    parser = build_parser()
    new = parser.parse_args(["predict", "a.jpg", "--model_path", "m.onnx", "--batch_size", "2", "--no_detect",
                             "--min_confidence", "0.5"])
    old = parser.parse_args(["predict", "a.jpg", "--model", "m.onnx", "--batch-size", "2", "--no-detect",
                             "--min-confidence", "0.5"])
    assert vars(new) == vars(old) and new.model_path == "m.onnx" and new.batch_size == 2
    assert parser.parse_args(["predict", "a.jpg"]).model_path is None  # the bundled default, resolved on load
    assert parser.parse_args(["serve", "--max-pixels", "10"]).max_pixels == 10
    assert parser.parse_args(["evaluate", "--model", "m.pt", "--val_txt", "v", "--output_csv", "o"]).model_path == "m.pt"
    _subcommands(parser)["predict"].print_help()
    shown = capsys.readouterr().out
    assert "--model_path" in shown and "--batch_size" in shown
    assert "--model " not in shown and "--batch-size" not in shown and "--no-detect" not in shown

    with pytest.raises(SystemExit):  # errors name flags as --help does, without their hidden aliases
        parser.parse_args(["evaluate", "--val_txt", "v", "--output_csv", "o", "--batch_size", "x"])
    error = capsys.readouterr().err
    assert "argument --batch_size: invalid int value: 'x'" in error and "--batch-size" not in error
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--val_txt", "v"])
    error = capsys.readouterr().err
    assert "required: --model_path, --output_csv" in error
