"""`raybone report`: the HTML page (page.py, page.html.j2) and its matplotlib figures (figures.py)."""

from raybone.report.page import PAGE, write_report

__all__ = ["PAGE", "write_report"]
