"""tools/duplicate_code.py, the copy check of `make lint`: it finds copies within a file and across
files, passes over what does not count, and holds the tree to its baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("duplicate_code", REPO / "tools" / "duplicate_code.py")
assert spec and spec.loader
duplicate_code = importlib.util.module_from_spec(spec)
spec.loader.exec_module(duplicate_code)

BLOCK = """
    total = 0
    for item in items:
        if item.ready:
            total += item.size
        else:
            skipped.append(item)
    report(total, skipped)
"""


def lines_of(tmp_path: Path, **files: str) -> dict[str, list[tuple[int, str]]]:
    found = {}
    for name, source in files.items():
        path = tmp_path / f"{name}.py"
        path.write_text(source)
        found[name] = duplicate_code.significant_lines(path)
    return found


def test_a_copy_within_a_file_and_across_files_is_found(tmp_path: Path) -> None:
    one = f"def a(items, skipped):{BLOCK}\n\ndef b(items, skipped):{BLOCK}"
    other = f"def c(items, skipped):  # the same again\n{BLOCK}"
    counts = duplicate_code.shared_line_counts(
        duplicate_code.find_copies(lines_of(tmp_path, one=one, other=other))
    )
    # both copies in `one` stand in `other`: 14 of its lines
    assert counts == {("one", "one"): 7, ("one", "other"): 14}


def test_docstrings_imports_comments_and_brackets_do_not_count(tmp_path: Path) -> None:
    padding = '"""Docstring\n\nof the module."""\nimport os\n'
    padding += "from sys import (\n    argv,\n    path,\n)\n# comment\n"
    short = "def a(x):\n    y = x + 1\n    return (\n        y,\n    )\n"
    found = duplicate_code.find_copies(lines_of(tmp_path, one=padding + short, other=padding + short))
    assert found == {}


def test_the_tree_holds_to_its_baseline() -> None:
    assert duplicate_code.main([]) == 0
