"""The docs stay in step with the code: flag tables generated from the parsers, a short README, no dead links.

Flag tables in docs/*.md are written by scripts/doc_flags.py between ``<!-- flags:COMMAND -->`` markers; a
parser change without ``python scripts/doc_flags.py`` makes ``--check`` (and this test) fail, naming the page.
"""
from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

import pytest

from conftest import REPO, load_script

README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 250


@pytest.fixture(scope="module")
def doc_flags():
    return load_script(REPO / "scripts" / "doc_flags.py", "doc_flags")


def test_flag_tables_match_the_parsers(doc_flags, capsys):
    rc = doc_flags.main(["--check"])
    err = capsys.readouterr().err
    assert rc == 0, f"stale docs; run python scripts/doc_flags.py\n{err}"


def test_check_names_a_page_whose_table_is_out_of_step(doc_flags, tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    page = docs / "inference.md"
    text = page.read_text(encoding="utf-8")
    row = next(line for line in text.splitlines() if line.startswith("| `--detect_size` |"))
    page.write_text(text.replace(row, row.replace("`480`", "`640`")), encoding="utf-8")
    monkeypatch.setattr(doc_flags, "DOCS", docs)
    assert doc_flags.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "docs/inference.md: stale flag table" in err
    assert "training.md" not in err
    # Writing mode puts it right again, and then the check passes.
    assert doc_flags.main([]) == 0
    assert doc_flags.main(["--check"]) == 0
    assert page.read_text(encoding="utf-8") == text


def test_check_requires_the_main_tables(doc_flags, tmp_path, monkeypatch, capsys):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS, docs)
    page = docs / "serving.md"
    text = page.read_text(encoding="utf-8")
    page.write_text(re.sub(r"<!-- flags:serve -->.*?<!-- /flags:serve -->\n", "", text, flags=re.DOTALL),
                    encoding="utf-8")
    monkeypatch.setattr(doc_flags, "DOCS", docs)
    assert doc_flags.main(["--check"]) == 1
    assert "docs/serving.md: no <!-- flags:serve -->" in capsys.readouterr().err


def test_generated_tables_leave_out_hidden_aliases_and_machine_defaults(doc_flags):
    tables = {name: doc_flags.flag_table(name, parser, doc_flags.machine_defaults())
              for name, parser in doc_flags.build_parsers().items()}
    assert "`--model_path`" in tables["predict"] and "`--model`" not in tables["predict"]
    assert "`--batch-size`" not in tables["serve"] and "`--max_bytes`" in tables["serve"]
    assert "| `--workers` | min(4, CPUs) |" in tables["train"]


def test_readme_is_short_and_keeps_the_seed_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_README_LINES
    for needle in ("python train.py --dataset D --checkpoint_dir C --log_file L --train_txt T --val_txt V",
                   "python evaluation.py --root_dir R --model_path M --output_csv O.csv --output_html O.html",
                   "Epoch 1/3 | Train Loss", "Class-wise accuracies:", "What these labels are"):
        assert needle in text, needle


FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.DOTALL | re.MULTILINE)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _anchors(path: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out = set()
    for title in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title)
        slug = "".join(c for c in title.lower() if c in " -_" or unicodedata.category(c)[0] in "LN")
        slug = slug.replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files_and_headings(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no such file")
        elif anchor and path.suffix == ".md" and anchor not in _anchors(path):
            broken.append(f"{target}: no such heading in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_docs_page_opens_with_a_runnable_example():
    for page in sorted(DOCS.glob("*.md")):
        text = page.read_text(encoding="utf-8")
        first_block = text.find("```")
        first_section = text.find("\n## ")
        assert first_block != -1 and (first_section == -1 or first_block < first_section), page.name
        assert re.match(r"```(bash|sh|console)?\n", text[first_block:]), page.name
