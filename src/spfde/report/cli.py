"""argparse entry points for ``spfde report`` and ``spfde compare`` (usable without spfde.cli).

The arguments and what the commands print live here once; ``spfde.cli`` adds the same
arguments to its sub-commands and calls :func:`run_report` / :func:`run_compare`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spfde.errors import SpfdeError

REPORT_HELP = "write report.md (or .html) with plots that answer one question each, for run directories"
COMPARE_HELP = "compare run directories in one table: accuracy, FLOPs and wall-clock side by side"


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (the --out folders of `spfde train`); several runs share the first plots")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default: the first run directory)")
    p.add_argument("--html", action="store_true", help="write report.html instead of report.md")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories, e.g. runs/*; runs differing only in seed share a row; folders that are "
                        "not finished runs are skipped with a note")
    p.add_argument("--json", action="store_true", help="print the rows as JSON (notes still go to stderr)")


def run_report(ns: argparse.Namespace) -> int:
    from spfde.report.document import write_report

    path = write_report([Path(r) for r in ns.runs], Path(ns.out) if ns.out else None,
                        fmt="html" if ns.html else "md")
    print(f"report: {path}")
    return 0


def run_compare(ns: argparse.Namespace) -> int:
    from spfde.report.compare import compare_footnotes, compare_runs, format_compare_table

    notes: list[str] = []
    rows = compare_runs([Path(r) for r in ns.runs], notes=notes)  # with no run left, the error holds the notes
    for n in notes:  # stderr: `--json` output stays machine-readable
        print(f"note: {n}", file=sys.stderr)
    if ns.json:
        print(json.dumps(rows, indent=2))
    else:
        print(format_compare_table(rows) + "".join(f"\n{n}" for n in compare_footnotes(rows)))
    return 0


def _main(prog: str, help_text: str, add, run, args: list[str] | None) -> int:
    p = argparse.ArgumentParser(prog=prog, description=help_text)
    add(p)
    ns = p.parse_args(args)
    try:
        return run(ns)
    except SpfdeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code


def report_main(args: list[str] | None = None) -> int:
    """``spfde report RUN_DIR [RUN_DIR ...] [--out DIR] [--html]``; prints the report's path."""
    return _main("spfde report", REPORT_HELP, add_report_arguments, run_report, args)


def compare_main(args: list[str] | None = None) -> int:
    """``spfde compare RUN_DIR ... [--json]``; prints the table (or the rows as JSON)."""
    return _main("spfde compare", COMPARE_HELP, add_compare_arguments, run_compare, args)
