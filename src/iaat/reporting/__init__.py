"""Figures and tables from saved runs (never from a live process): ``iaat report``."""

from .collect import RunRecord, collect_runs
from .report import make_report

__all__ = ["RunRecord", "collect_runs", "make_report"]
