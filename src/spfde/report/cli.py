"""argparse entry points for ``spfde report`` and ``spfde compare`` (usable without spfde.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from spfde.errors import SpfdeError


def report_main(args: list[str] | None = None) -> int:
    """``spfde report RUN_DIR [RUN_DIR ...] [--out DIR] [--html]``; prints the report's path."""
    from spfde.report.document import write_report

    p = argparse.ArgumentParser(prog="spfde report", description="write report.md with plots for run directories")
    p.add_argument("runs", nargs="+", help="run directories (the --out folders of `spfde train`)")
    p.add_argument("--out", default=None, help="report folder (default: the first run directory)")
    p.add_argument("--html", action="store_true", help="write report.html instead of report.md")
    ns = p.parse_args(args)
    try:
        path = write_report([Path(r) for r in ns.runs], Path(ns.out) if ns.out else None,
                            fmt="html" if ns.html else "md")
    except SpfdeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"report: {path}")
    return 0


def compare_main(args: list[str] | None = None) -> int:
    """``spfde compare RUN_DIR ... [--json]``; prints the table (or the rows as JSON)."""
    from spfde.report.compare import compare_runs, format_compare_table

    p = argparse.ArgumentParser(prog="spfde compare", description="compare run directories in one table")
    p.add_argument("runs", nargs="+", help="finished run directories; runs differing only in seed are grouped")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    ns = p.parse_args(args)
    try:
        rows = compare_runs([Path(r) for r in ns.runs])
    except SpfdeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(json.dumps(rows, indent=2) if ns.json else format_compare_table(rows), end="" if not ns.json else "\n")
    return 0
