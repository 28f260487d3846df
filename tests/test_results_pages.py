"""bench/results_pages.py: the docs' results tables name each row's own commit, else the file's, else none."""
from __future__ import annotations

import json

import pytest

from bench import results_pages as rp


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(rp, "RESULTS", tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({
        "command": "python -m bench.a",
        "rows": [{"run": "x", "ppl": 12.345, "code": {"commit": "1" * 40, "dirty": False}},
                 {"run": "y", "ppl": 0.5, "commit_of_row": "2" * 40},
                 {"run": "z", "ppl": 3}],
        "code": {"commit": "3" * 40, "dirty": True}}))
    (tmp_path / "b.json").write_text(json.dumps({"results": {"w": {"t": {"total": 2.0}}}}))
    return tmp_path


def test_each_row_names_its_commit(results):
    lines = rp.table("a.json", columns=["run", "ppl"]).splitlines()
    assert lines[0] == "From `bench/results/a.json` (`python -m bench.a`):"
    assert lines[4:] == ["| x | 12.35 | `1111111` |", "| y | 0.5 | `2222222` (dirty?) |",
                         "| z | 3 | `3333333` (dirty) |"]
    assert rp.table("b.json", "results", ["t.total"]).splitlines()[4] == "| w | 2.00 | commit unknown |"


def test_glob_paths_and_errors(results):
    assert "| `a.json` |" not in rp.table("a.json") and rp.table("*.json", columns=["run"]).count("| `a.json` |") == 3
    chain = rp.walk(json.loads((results / "a.json").read_text()), "rows[run=y].ppl")
    assert chain[-1] == 0.5 and rp.provenance(chain) == ("2" * 40, None)
    with pytest.raises(rp.ResultsError, match="matches 0 rows"):
        rp.walk({"rows": [{"run": "x"}]}, "rows[run=q]")
    with pytest.raises(rp.ResultsError, match="no row has a column"):
        rp.table("a.json", columns=["nope"])
    with pytest.raises(rp.ResultsError, match="no result file"):
        rp.render("<!-- results: c.json -->\n")


def test_index_lists_every_file_and_renders_the_unshown(results):
    out = rp.index({"a.json": "a-page.md"})
    assert "| `a.json` | `1111111`; `2222222` (dirty?); `3333333` (dirty) | [a-page](a-page.md) |" in out
    assert "| `b.json` | commit unknown | below |" in out and "### `b.json`" in out
