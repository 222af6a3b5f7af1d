"""results/INDEX.md from the results files themselves: file -> command -> headline figure.

Command:  .venv/bin/python experiments/index.py           (seconds; after any experiment)
Check:    .venv/bin/python experiments/index.py --check   (exit 1 if INDEX.md is stale)

Reads every JSON file under the results folder (its subfolders too) and writes one row per
file: the command that wrote it, its headline figure (what the file states as its main
measurement; a file of no known kind says it has none), and the rest of its provenance
(commit, date, machine, packages). Files written before the provenance was recorded say
"not recorded" for each field they lack. The test suite checks that the committed INDEX.md
is what this writes.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import headlines
import provenance

RESULTS = Path(__file__).parent / "results"
NAME = "INDEX.md"
NONE = provenance.NOT_RECORDED


def generate(results: Path) -> str:
    """INDEX.md's text for the JSON files under `results`, in path order."""
    lines = [
        "# Results index",
        "",
        "Generated from the results files by `.venv/bin/python experiments/index.py`; do not",
        'edit. "not recorded": the file was written before its provenance was recorded.',
        "",
        "| file | command | headline figure | commit | date | machine | packages |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted(results.rglob("*.json")):
        lines.append(_row(path.relative_to(results), json.loads(path.read_text()), path))
    return "\n".join(lines) + "\n"


def _row(name: Path, record, path: Path) -> str:
    got = record.get("provenance", {}) if isinstance(record, dict) else {}
    machine, packages = got.get("machine"), got.get("packages")
    commit = got.get("commit") and got["commit"][:12]
    if commit and got.get("uncommitted_changes"):
        commit += " (uncommitted changes)"
    cells = [
        f"`{name}`",
        f"`{got['command']}`" if got.get("command") else _stated(path),
        headlines.headline(name.stem, record),
        commit or NONE,
        got["date"][:10] if got.get("date") else NONE,
        f"{machine['cpu']}, {machine['cores']} cores" if machine else NONE,
        ", ".join(f"{k} {packages[k]}" for k in ("jax", "flax") if k in packages)
        if packages
        else NONE,
    ]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _stated(path: Path) -> str:
    """For a file without provenance: "not recorded", and the command its Markdown names
    (the command its script printed there, not a record of the run's flags)."""
    md = path.with_suffix(".md")
    found = (
        re.search(r"`((?:sudo )?\.venv/bin/python [^`]+)`", md.read_text()) if md.exists() else None
    )
    return f"{NONE} (its .md names `{found[1]}`)" if found else NONE


def main(argv=None) -> int:
    from prism_jax.cli.parser import Parser

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS, help="the results folder")
    parser.add_argument("--check", action="store_true", help="exit 1 if INDEX.md is stale")
    args = parser.parse_args(argv)
    if not args.results.is_dir() or not any(args.results.rglob("*.json")):
        parser.error(f"argument --results: no results files (*.json) in {args.results}")
    text, index = generate(args.results), args.results / NAME
    if args.check:
        if not index.exists() or index.read_text() != text:
            print(f"index.py: {index} is stale: run experiments/index.py", file=sys.stderr)
            return 1
        return 0
    index.write_text(text)
    print(f"wrote {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
