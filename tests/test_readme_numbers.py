"""The README's headline table quotes bench/results/ truly.

Between ``<!-- headline:start -->`` and ``<!-- headline:end -->`` every number of the ``result`` column carries, right
after it, a reference ``<!--r FILE PATH [*K|/K]-->``: the result file (relative to bench/results), the path of the
value in it (``rows[run=wanda].ppl``; see ``bench/results_pages.walk``) and an optional scale. The check:

- the number equals the file's value at the precision shown (``64.86`` for 64.85997...);
- the row records a commit (its own, else the file's: ``bench/results_pages.provenance``), which is an ancestor of
  HEAD (skipped outside a git checkout, or for a commit a shallow clone lacks);
- a row from a clean tree is shown plain, a row from a dirty tree (or one whose tree state was not recorded) carries
  ``†``, and the README explains the mark;
- every relative link of the README reaches a file, and an anchor a heading of it.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

from bench.results_pages import ResultsError, load, provenance, walk

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
NUMBER = r"-?\d+(?:\.\d+)?"
REF = re.compile(rf"(?P<num>{NUMBER})(?P<unit>[^\d<|†]{{0,6}}?)(?P<mark>†?)\s*"
                 r"<!--r\s+(?P<file>\S+)\s+(?P<path>.+?)(?:\s+(?P<scale>[*/][\d.e+]+))?\s*-->")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def headline(text: str) -> list[list[str]]:
    """The headline table's rows as lists of cells (the header row first)."""
    m = re.search(r"<!-- headline:start -->\n(.*?)\n<!-- headline:end -->", text, re.S)
    assert m, "README.md has no <!-- headline:start --> ... <!-- headline:end --> block"
    rows = [line.strip().strip("|").split("|") for line in m.group(1).splitlines() if line.startswith("|")]
    return [[c.strip() for c in r] for r in rows if not set("".join(r)) <= set("-: ")]


def _git(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def _in_checkout() -> bool:
    try:
        return _git("rev-parse", "--is-inside-work-tree").stdout.strip() == "true"
    except OSError:
        return False


def check_commit(commit: str) -> str | None:
    """Why ``commit`` cannot back a README number, or None."""
    if not _in_checkout():
        return None
    rc = _git("merge-base", "--is-ancestor", commit, "HEAD").returncode
    if rc == 0:
        return None
    if rc == 1:
        return f"commit {commit[:12]} is not an ancestor of HEAD"
    if _git("rev-parse", "--is-shallow-repository").stdout.strip() == "true":
        return None
    return f"commit {commit[:12]} is unknown to this repository"


def problems(text: str) -> list[str]:
    """Everything wrong with the headline table of the README ``text``."""
    rows = headline(text)
    out, marked = [], False
    col = rows[0].index("result")
    for row in rows[1:]:
        cell = row[col]
        refs = list(REF.finditer(cell))
        if not refs:
            out.append(f"row {row[0]!r}: no referenced number in the result column")
        rest = REF.sub("", cell)
        if re.search(r"\d", rest):
            out.append(f"row {row[0]!r}: a number without a <!--r FILE PATH--> reference: {rest!r}")
        for m in refs:
            where = f"{row[0]!r} {m['num']}{m['unit']} ({m['file']} {m['path']})"
            try:
                chain = walk(load(m["file"]), m["path"])
            except ResultsError as e:
                out.append(f"{where}: {e}")
                continue
            value = chain[-1]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                out.append(f"{where}: the value there is {value!r}, not a number")
                continue
            if m["scale"]:
                k = float(m["scale"][1:])
                value = value * k if m["scale"][0] == "*" else value / k
            decimals = len(m["num"].partition(".")[2])
            if abs(float(m["num"]) - value) > 0.5 * 10 ** -decimals + 1e-9:
                out.append(f"{where}: the file says {value!r} (shown as {round(value, decimals)})")
            commit, dirty = provenance(chain)
            marked |= bool(m["mark"])
            if not commit:
                out.append(f"{where}: the row records no commit; rerun it with the current bench scripts")
                continue
            why = check_commit(commit)
            if why:
                out.append(f"{where}: {why}")
            if dirty is False and m["mark"]:
                out.append(f"{where}: measured on a clean tree at {commit[:12]}: drop the †")
            if dirty is not False and not m["mark"]:
                state = "a dirty tree" if dirty else "a tree whose state was not recorded"
                out.append(f"{where}: measured on {state} at {commit[:12]}: mark it with † or rerun it")
    if marked and not re.search(r"^† ", text, re.M):
        out.append("the table uses † but no line of the README starting with '† ' explains it")
    return out


def _slug(heading: str) -> str:
    explicit = re.search(r"\{\s*#([\w-]+)\s*\}", heading)
    if explicit:
        return explicit.group(1)
    s = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return s.replace(" ", "-")


def broken_links(text: str, base: Path) -> list[str]:
    out = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        path, _, anchor = target.partition("#")
        file = (base / path).resolve()
        if not file.exists():
            out.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md":
            slugs = {_slug(h) for h in re.findall(r"^#+\s+(.*)$", file.read_text(), re.M)}
            if anchor not in slugs:
                out.append(f"{target}: no heading with that anchor")
    return out


def test_headline_numbers_are_the_results():
    found = problems(README.read_text())
    assert not found, "README.md headline table:\n" + "\n".join(found)


def test_readme_links_resolve():
    found = broken_links(README.read_text(), REPO)
    assert not found, "README.md links:\n" + "\n".join(found)


def test_the_check_fails_on_a_broken_readme(monkeypatch):
    """The check itself can fail: a changed number, a missing mark, a mark on a clean row, an unknown row, an
    unreferenced number, and a broken link are each reported. The dirty row is a stand-in result file (the README's
    own rows may all be clean)."""
    import test_readme_numbers as me

    head = _git("rev-parse", "HEAD").stdout.strip() or None
    fake = {"ppl": 350.754, "code": {"commit": head or "0" * 40, "dirty": True}}
    real = me.load
    monkeypatch.setattr(me, "load", lambda name: fake if name == "dirty_example.json" else real(name))
    clean = "64.86<!--r solvers_50.json rows[run=wanda].ppl-->"  # a row produced at a clean commit
    dirty = "350.75†<!--r dirty_example.json ppl-->"  # a row produced on a dirty tree, marked
    text = README.read_text()
    assert clean in text, "the example row moved: update this test"
    text = text.replace(clean, f"{clean} / {dirty}")
    cases = {
        (clean, "64.87<!--r solvers_50.json rows[run=wanda].ppl-->"): "the file says 64.8599",
        (clean, "64.86†<!--r solvers_50.json rows[run=wanda].ppl-->"): "drop the †",
        (dirty, "350.75<!--r dirty_example.json ppl-->"): "mark it with †",
        (clean, "64.86<!--r solvers_50.json rows[run=nope].ppl-->"): "matches 0 rows",
        (clean, "64.86 / 12.5<!--r solvers_50.json rows[run=wanda].ppl-->"): "the file says",
        (clean, "12 and 64.86<!--r solvers_50.json rows[run=wanda].ppl-->"): "without a <!--r",
    }
    assert not problems(text)
    for (good, bad), expect in cases.items():
        found = problems(text.replace(good, bad))
        assert any(expect in p for p in found), (bad, found)
    assert broken_links("[a](docs/nope.md) [b](docs/prune.md#nope) [c](docs/prune.md)", REPO) == [
        "docs/nope.md: no such file", "docs/prune.md#nope: no heading with that anchor"]
