"""Human-readable results: PNG plots, example segmentations and a Markdown report from ``metrics.json``."""

from monai_fedpriv.report.markdown import write_report

__all__ = ["write_report"]
