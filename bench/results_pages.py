"""Results tables for the docs, generated from ``bench/results/*.json`` with each row's commit.

A docs page asks for a table with a directive on a line of its own::

    <!-- results: solvers_50.json rows columns=run,ppl,prune_s -->

- the file, relative to ``bench/results``;
- optionally the path of the rows inside it (``rows``, ``results``, ``models.slim``; ``[key=value]`` picks list
  items, ``a.b`` nested keys); without it the rows are found (a top-level list, a list or mapping of objects under
  ``rows``/``results``/``runs``/``models``, else the file itself as one row);
- optionally ``columns=`` (flattened keys, ``timings.solve``), else every short scalar field.

Every table ends with a ``commit`` column: the row's own provenance (``code: {commit, dirty}``, ``commit`` /
``dirty``, or ``commit_of_row``), else that of the nearest enclosing object (the file's ``code``); a row with none
says ``commit unknown``. The same rule serves ``tests/test_readme_numbers.py``, which checks the README's numbers.

Used as a MkDocs hook (``hooks:`` in mkdocs.yml): ``mkdocs build`` renders the tables from the JSON on every build,
so the pages cannot go stale. ``<!-- results-index -->`` renders the list of every result file with its commits
and the page that shows it (files that no page shows get their table there). From the shell,
``python -m bench.results_pages FILE [PATH]`` prints one table.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DIRECTIVE = re.compile(r"^<!--\s*results:\s*(?P<args>.*?)\s*-->\s*$", re.M)
INDEX = "<!-- results-index -->"
ROW_KEYS = ("rows", "results", "runs", "models")
HIDDEN = {"code", "commit", "dirty", "commit_of_row"}
_TOKEN = re.compile(r"\[([^\]]*)\]|([^.\[\]]+)")


class ResultsError(ValueError):
    """A directive or a README reference that does not resolve against bench/results."""


def load(name: str):
    path = RESULTS / name
    if path.suffix != ".json" or not path.is_file():
        raise ResultsError(f"no result file bench/results/{name}")
    return json.loads(path.read_text())


def _matches(item, filters: str) -> bool:
    if not isinstance(item, dict):
        return False
    for cond in filters.split(","):
        key, _, want = cond.partition("=")
        have = item
        for part in key.strip().split("."):
            have = have.get(part) if isinstance(have, dict) else None
        want = want.strip()
        if isinstance(have, bool) or have is None or isinstance(have, str):
            if str(have).lower() != want.lower() and str(have) != want:
                return False
        elif isinstance(have, (int, float)):
            try:
                if float(want) != have:
                    return False
            except ValueError:
                return False
        else:
            return False
    return True


def walk(data, path: str) -> list:
    """The chain of objects from the file's top to ``path`` (the last one is the value there). ``a.b`` follows keys,
    ``[k=v,k2=v2]`` picks the one list item whose fields match (``k`` may be nested: ``config.scheme``), ``[3]`` an
    index."""
    chain = [data]
    for filt, key in _TOKEN.findall(path.strip()):
        cur = chain[-1]
        if key:
            if not isinstance(cur, dict) or key not in cur:
                raise ResultsError(f"no key {key!r} at {path!r}")
            chain.append(cur[key])
        elif filt.strip().lstrip("-").isdigit():
            if not isinstance(cur, list) or not -len(cur) <= int(filt) < len(cur):
                raise ResultsError(f"no item [{filt}] at {path!r}")
            chain.append(cur[int(filt)])
        else:
            items = cur.values() if isinstance(cur, dict) else cur if isinstance(cur, list) else []
            hits = [x for x in items if _matches(x, filt)]
            if len(hits) != 1:
                raise ResultsError(f"[{filt}] matches {len(hits)} rows at {path!r}, not one")
            chain.append(hits[0])
    return chain


def provenance(chain: list) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the innermost object in ``chain`` that records one; dirty is None when unrecorded."""
    for obj in reversed(chain):
        if not isinstance(obj, dict):
            continue
        code = obj.get("code")
        if isinstance(code, dict) and code.get("commit"):
            return code["commit"], code.get("dirty")
        if isinstance(obj.get("commit"), str) and obj["commit"]:
            return obj["commit"], obj.get("dirty")
        row = obj.get("commit_of_row")
        if isinstance(row, dict) and row.get("commit"):  # {commit, dirty, ...} in one field
            return row["commit"], row.get("dirty")
        if isinstance(row, str) and row:
            return row, obj.get("dirty")
    return None, None


def commit_cell(commit: str | None, dirty: bool | None) -> str:
    if not commit:
        return "commit unknown"
    return f"`{commit[:7]}`" + {True: " (dirty)", None: " (dirty?)", False: ""}[dirty]


def fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10_000 else str(v)
    if isinstance(v, float):
        if v != v or v in (float("inf"), float("-inf")):
            return str(v)
        if abs(v) >= 10_000:
            return f"{v:,.0f}"
        if abs(v) >= 1 or v == 0:
            return f"{v:.2f}"
        return f"{v:.4g}"
    text = str(v).replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text.startswith(("python ", "layerprune ", "bash ")) else text


def flatten(row: dict, prefix: str = "", depth: int = 2) -> dict:
    out = {}
    for k, v in row.items():
        if k in HIDDEN:
            continue
        key = f"{prefix}{k}"
        if isinstance(v, dict) and depth > 1:
            out.update(flatten(v, key + ".", depth - 1))
        elif not isinstance(v, (dict, list)) and not (isinstance(v, str) and len(v) > 60):
            out[key] = v
    return out


def find_rows(data, path: str | None):
    """[(label, chain)] for the rows at ``path`` (or found), each chain running from the file's top to the row."""
    if path:
        chain = walk(data, path)
    else:
        chain = [data]
        if isinstance(data, dict):
            for k in ROW_KEYS:
                v = data.get(k)
                if isinstance(v, list) and v and all(isinstance(x, dict) for x in v) or (
                        isinstance(v, dict) and v and all(isinstance(x, dict) for x in v.values())):
                    chain = [data, v]
                    break
    top = chain[-1]
    if isinstance(top, list):
        return [(None, chain + [x]) for x in top if isinstance(x, dict)]
    if isinstance(top, dict) and len(chain) > 1 and top and all(isinstance(x, dict) for x in top.values()):
        return [(k, chain + [v]) for k, v in top.items()]
    return [(None, chain)]


def expand(name: str) -> list[str]:
    """The result files ``name`` names: itself, or those its glob matches."""
    if not any(c in name for c in "*?["):
        return [name]
    return sorted(str(p.relative_to(RESULTS)) for p in RESULTS.glob(name))


def table(name: str, path: str | None = None, columns: list[str] | None = None) -> str:
    """A markdown table of the rows of one result file, or of several (``name`` a glob: a ``file`` column is added)."""
    names = expand(name)
    if not names:
        raise ResultsError(f"no result file matches bench/results/{name}")
    rows = []
    for n in names:
        data = load(n)
        rows += [(n, label, chain) for label, chain in find_rows(data, path)]
    flat = [flatten(chain[-1], depth=2 if columns is None else 6) for _, _, chain in rows]
    if columns is None:
        columns = []
        for f in flat:
            columns += [k for k in f if k not in columns]
    else:
        for c in columns:
            if all(c not in f for f in flat):
                raise ResultsError(f"bench/results/{name}: no row has a column {c!r}")
    several = len(names) > 1
    labelled = any(label is not None for _, label, _ in rows)
    head = (["file"] if several else []) + (["row"] if labelled else []) + columns + ["commit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (n, label, chain), f in zip(rows, flat):
        cells = ([f"`{n}`"] if several else []) + ([fmt(label)] if labelled else []) + [fmt(f.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells + [commit_cell(*provenance(chain))]) + " |")
    if several:
        src = f"From `bench/results/{name}`:"
    else:
        command = rows[0][2][0].get("command") if rows and isinstance(rows[0][2][0], dict) else None
        src = f"From `bench/results/{name}`" + (f" (`{command}`)" if isinstance(command, str) else "") + ":"
    return src + "\n\n" + "\n".join(lines) + "\n"


def parse_directive(args: str) -> tuple[str, str | None, list[str] | None]:
    parts = args.split()
    if not parts:
        raise ResultsError("empty results directive")
    name, path, columns = parts[0], None, None
    for p in parts[1:]:
        if p.startswith("columns="):
            columns = [c for c in p[len("columns="):].split(",") if c]
        elif path is None:
            path = p
        else:
            raise ResultsError(f"results directive {args!r}: one path only (use [k=v] without spaces)")
    return name, path, columns


def render(markdown: str, shown: dict[str, str] | None = None) -> str:
    def one(m):
        return table(*parse_directive(m.group("args")))
    out = DIRECTIVE.sub(one, markdown)
    if INDEX in out:
        out = out.replace(INDEX, index(shown or {}))
    return out


def all_files() -> list[str]:
    return sorted(str(p.relative_to(RESULTS)) for p in RESULTS.rglob("*.json"))


def commits_of(name: str) -> str:
    data = load(name)
    seen: dict[str, int] = {}
    for _, chain in find_rows(data, None):
        cell = commit_cell(*provenance(chain))
        seen[cell] = seen.get(cell, 0) + 1
    return "; ".join(c if n == 1 else f"{c} ({n} rows)" for c, n in seen.items())


def index(shown: dict[str, str]) -> str:
    lines = ["| file | commit(s) | shown on |", "|---|---|---|"]
    rest = []
    for name in all_files():
        page = shown.get(name)
        if page is None:
            rest.append(name)
        where = f"[{Path(page).stem}]({page})" if page else "below"
        lines.append(f"| `{name}` | {commits_of(name)} | {where} |")
    out = "\n".join(lines) + "\n"
    if rest:
        out += "\n## Other result files\n\n" + "\n".join(f"### `{n}`\n\n{table(n)}" for n in rest)
    return out


def directives_in(text: str) -> list[str]:
    """The result files the directives in ``text`` show (globs expanded)."""
    out = []
    for m in DIRECTIVE.finditer(text):
        out += expand(parse_directive(m.group("args"))[0])
    return out


# --- MkDocs hook ---------------------------------------------------------------------------------------------
_shown: dict[str, str] = {}


def on_files(files, config):
    """Note which page shows each result file, for the index page's links (relative to docs/results/)."""
    _shown.clear()
    for f in files:
        if f.src_uri.endswith(".md") and f.abs_src_path:
            for name in directives_in(Path(f.abs_src_path).read_text(encoding="utf-8")):
                rel = Path(f.src_uri)
                _shown.setdefault(name, rel.name if rel.parent.as_posix() == "results" else "../" + rel.as_posix())
    return files


def on_page_markdown(markdown, page, config, files):
    try:
        return render(markdown, _shown)
    except ResultsError as e:
        from mkdocs.exceptions import PluginError
        raise PluginError(f"{page.file.src_uri}: {e}") from None


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) > 1 else 2)
    try:
        print(table(sys.argv[1], *(sys.argv[2:3] or [None])))
    except ResultsError as e:
        raise SystemExit(f"error: {e}") from None
