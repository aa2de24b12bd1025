"""Run reports with plots (``spfde report``) and run comparison tables (``spfde compare``).

- :func:`write_report`: ``report.md``/``report.html`` + PNG plots for one or more run directories
  (the files of docs/design.md, "Run outputs").
- :func:`compare_runs`, :func:`format_compare_table`: one row per experiment, seeds grouped, final
  accuracy as mean ± std, training FLOPs and their saving, wall-clock and peak memory.
- :class:`TensorBoardLogger`: the per-epoch metrics as TensorBoard scalars (``logging.tensorboard``).
- :func:`report_main`, :func:`compare_main`: argparse entry points taking an argument list.
"""

from spfde.analysis.artifacts import save_forgetting_histogram
from spfde.report.cli import compare_main, report_main
from spfde.report.compare import compare_runs, format_compare_table
from spfde.report.document import build_report, render_html, render_markdown, report_images, write_report
from spfde.report.runs import Run, load_run, load_runs
from spfde.report.tensorboard import TensorBoardLogger, metrics_to_scalars

__all__ = [
    "Run",
    "TensorBoardLogger",
    "build_report",
    "compare_main",
    "compare_runs",
    "format_compare_table",
    "load_run",
    "load_runs",
    "metrics_to_scalars",
    "render_html",
    "render_markdown",
    "report_images",
    "report_main",
    "save_forgetting_histogram",
    "write_report",
]
