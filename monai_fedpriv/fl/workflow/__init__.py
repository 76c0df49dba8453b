"""The one run loop of every federated method, and the channel contract its transports adapt to.

:class:`RunLoop` owns the rounds: the strategy configures a round (which sites, what each is told), the channel
broadcasts the global model with those instructions and gathers the answers (failures and timeouts included), the
shared :class:`~monai_fedpriv.fl.server.ServerRound` screens and aggregates, and the loop records the round, applies
the stop policy, checkpoints (one format, one fingerprint) and writes ``metrics.json``. The in-process simulator
(:mod:`monai_fedpriv.fl.simulator`) and the NVIDIA FLARE controller (:mod:`monai_fedpriv.fl.nvflare.controller`) are
:class:`ServerChannel` adapters over it; a method is a strategy, never a loop.
"""

from monai_fedpriv.fl.workflow.channel import Gathered, RoundRequest, ServerChannel
from monai_fedpriv.fl.workflow.loop import RunLoop
from monai_fedpriv.fl.workflow.state import CHECKPOINT_VERSION, RunState
from monai_fedpriv.fl.workflow.stop import Stop, StopKind, StopPolicy

__all__ = [
    "CHECKPOINT_VERSION", "Gathered", "RoundRequest", "RunLoop", "RunState", "ServerChannel", "Stop", "StopKind",
    "StopPolicy",
]  # fmt: skip
