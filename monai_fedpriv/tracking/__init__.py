"""Experiment tracking of federated runs: MLflow or TensorBoard fed from ``metrics.json``.

``series`` names what is logged (one name per quantity, for both backends), ``tracker`` decides what is new and
remembers it across ``--resume``, ``backends`` writes to MLflow or TensorBoard (local stores under the run folder by
default). Bundle runs on their own use MONAI's handlers; :class:`~monai_fedpriv.handlers.PrivacyBudgetHandler` puts
the site's epsilon where they log it.
"""

from monai_fedpriv.tracking.backends import (
    TRACKERS,
    check_tracking,
    default_mlflow_uri,
    open_tracker,
    parse_trackers,
    redact,
)
from monai_fedpriv.tracking.tracker import RunTracker

__all__ = [
    "TRACKERS", "RunTracker", "check_tracking", "default_mlflow_uri", "open_tracker", "parse_trackers", "redact",
]  # fmt: skip
