"""Run reports with plots (``spfde report``) and run comparison tables (``spfde compare``).

- :func:`write_report`: ``report.md``/``report.html`` + PNG plots for one or more run directories
  (the files of docs/design.md, "Run outputs"); each plot answers one question, stated beside it.
- :func:`compare_runs`, :func:`format_compare_table`, :func:`compare_footnotes`: one row per
  experiment, seeds grouped, final accuracy as mean ± std, training FLOPs and their saving beside
  wall-clock, time to accuracy, peak memory.
- :class:`TensorBoardLogger`: the per-epoch metrics as TensorBoard scalars (``logging.tensorboard``).
- :func:`report_main`, :func:`compare_main`: argparse entry points taking an argument list.

Names are imported on first use, so ``spfde --help`` (which adds the report/compare arguments
from :mod:`spfde.report.cli`) loads neither matplotlib nor torch.
"""

from importlib import import_module

_WHERE = {
    "save_forgetting_histogram": "spfde.analysis.artifacts",
    "compare_main": "spfde.report.cli", "report_main": "spfde.report.cli",
    "compare_footnotes": "spfde.report.compare", "compare_runs": "spfde.report.compare",
    "format_compare_table": "spfde.report.compare",
    "build_report": "spfde.report.document", "render_html": "spfde.report.document",
    "render_markdown": "spfde.report.document", "report_images": "spfde.report.document",
    "write_report": "spfde.report.document",
    "Run": "spfde.report.runs", "load_run": "spfde.report.runs", "load_runs": "spfde.report.runs",
    "TensorBoardLogger": "spfde.report.tensorboard", "metrics_to_scalars": "spfde.report.tensorboard",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'spfde.report' has no attribute {name!r}")
