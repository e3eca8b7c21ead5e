"""Run reports (report.json, report.md, report.html) from plain records; never imports torch."""

from __future__ import annotations

from edgecompress.report.render import ReportFiles, read_candidates, render_report, write_report

__all__ = ["ReportFiles", "read_candidates", "render_report", "write_report"]
