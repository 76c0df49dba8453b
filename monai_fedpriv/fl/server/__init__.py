"""The server side of federated training, independent of transport: screening, the round (screen, aggregate,
publish, record), per-round records and the round checkpoint. The in-process simulator and the NVIDIA FLARE
controller both call :class:`ServerRound`."""

from monai_fedpriv.fl.server.checkpoint import CHECKPOINT_VERSION, fingerprint_changes, load_round_checkpoint
from monai_fedpriv.fl.server.records import global_privacy, progress_cell, update_facts
from monai_fedpriv.fl.server.round import RoundOutcome, ServerRound, default_min_sites
from monai_fedpriv.fl.server.screening import ScreenSettings, screen_updates, update_l2_norm

__all__ = [
    "CHECKPOINT_VERSION",
    "RoundOutcome",
    "ScreenSettings",
    "ServerRound",
    "default_min_sites",
    "fingerprint_changes",
    "global_privacy",
    "load_round_checkpoint",
    "progress_cell",
    "screen_updates",
    "update_facts",
    "update_l2_norm",
]
