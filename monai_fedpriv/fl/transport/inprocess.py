"""The default transport: every site and the server live in one Python process."""

from __future__ import annotations

from collections.abc import Callable

from monai_fedpriv.fl.codec import decode_update, encode_update
from monai_fedpriv.fl.transport.base import Transport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    """Moves updates between in-process sites and the simulator's server loop.

    Every update is serialised with :mod:`monai_fedpriv.fl.codec` and decoded again, exactly as a remote transport
    would, so the server sees only what crossed the wire (unshared coordinates of sparse updates do not) and the
    number of bytes sent is measured, not estimated.

    Args:
        tamper: optional ``update -> update`` applied to what a site sends *after* its filters and before encoding:
            the fault injection of ``--inject-fault`` (a corrupt or malicious site), never a privacy path.
    """

    yields_control = True

    def __init__(self, tamper: Callable[[ModelUpdate], ModelUpdate] | None = None) -> None:
        self.current: GlobalModel | None = None
        self.inbox: dict[str, ModelUpdate] = {}
        self.wire_bytes: dict[str, int] = {}
        self.stopped_sites: set[str] = set()
        self.tamper = tamper

    def publish(self, model: GlobalModel) -> None:
        """Server side: make ``model`` the answer to every following :meth:`receive`."""
        self.current = model

    def receive(self, site: str) -> GlobalModel:
        if self.current is None:
            raise RuntimeError(f"{site} asked for the global model before the server published one.")
        if site in self.stopped_sites:
            return GlobalModel(self.current.round, self.current.weights, stop=True)
        return GlobalModel(
            round=self.current.round,
            weights={k: v.clone() for k, v in self.current.weights.items()},
            optimizer_state=(
                None
                if self.current.optimizer_state is None
                else {k: v.clone() for k, v in self.current.optimizer_state.items()}
            ),
            stop=self.current.stop,
        )

    def send(self, update: ModelUpdate) -> None:
        if update.site in self.inbox:
            raise RuntimeError(f"{update.site} sent two updates in round {update.round}.")
        if self.tamper is not None:
            update = self.tamper(update)
        data = encode_update(update)
        self.wire_bytes[update.site] = len(data)
        self.inbox[update.site] = decode_update(data)

    def has_update(self, site: str) -> bool:
        """Whether ``site`` has sent its update of the current round."""
        return site in self.inbox

    def collect(self) -> list[ModelUpdate]:
        """Server side: the updates received this round, in arrival order; empties the inbox."""
        updates = list(self.inbox.values())
        self.inbox = {}
        return updates
