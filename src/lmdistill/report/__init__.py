"""Plots and a Markdown report for a training run, read from its run directory.

The trainer writes the run directory; this package only reads it, so it also works on a run
that is still going or was killed. ``lmdistill report RUN_DIR [RUN_DIR ...]`` goes through
``main_report``. By concern: ``reading`` (the files into a ``RunRecord``), ``plots`` (PNGs),
``markdown`` (report.md), ``compare`` (several runs side by side).
"""

from lmdistill.report.compare import compare_runs, main_report
from lmdistill.report.markdown import write_report
from lmdistill.report.plots import COMPARE_PLOT_FILES, PLOT_FILES, write_plots
from lmdistill.report.reading import RunRecord, load_run, median_tokens_per_s

__all__ = [
    "COMPARE_PLOT_FILES",
    "PLOT_FILES",
    "RunRecord",
    "compare_runs",
    "load_run",
    "main_report",
    "median_tokens_per_s",
    "write_plots",
    "write_report",
]
