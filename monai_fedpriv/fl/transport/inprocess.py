"""The default transport: every site and the server live in one Python process."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import Expected, decode_update, encode_update
from monai_fedpriv.fl.transport.base import Transport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate

__all__ = ["InProcessTransport"]


class InProcessTransport(Transport):
    """Moves updates between in-process sites and the simulator's server loop.

    Every update is serialised with :mod:`monai_fedpriv.fl.codec` and decoded again, exactly as a remote transport
    would, so the server sees only what crossed the wire (unshared coordinates of sparse updates do not) and the
    number of bytes sent is measured, not estimated.

    The server's side decodes against what it expects (:class:`~monai_fedpriv.fl.wire.Expected`: the sending site,
    the round after the published model's, the published model's keys, shapes and dtypes), so nothing larger than
    the model is allocated; bytes that do not decode are that site's rejection (:meth:`take_rejected`), never an
    error in the site's training.

    Args:
        tamper: optional ``update -> update`` applied to what a site sends *after* its filters and before encoding:
            the fault injection of ``--inject-fault`` (a corrupt or malicious site), never a privacy path.
        tamper_bytes: optional ``(update, encoded bytes) -> bytes`` applied to the encoding, after ``tamper`` (the
            ``bytes`` fault): likewise testing only.
    """

    yields_control = True

    def __init__(
        self,
        tamper: Callable[[ModelUpdate], ModelUpdate] | None = None,
        tamper_bytes: Callable[[ModelUpdate, bytes], bytes] | None = None,
    ) -> None:
        self.current: GlobalModel | None = None
        self.inbox: dict[str, ModelUpdate] = {}
        self.rejected: dict[str, str] = {}
        self.wire_bytes: dict[str, int] = {}
        self.stopped_sites: set[str] = set()
        self.tamper = tamper
        self.tamper_bytes = tamper_bytes
        self._expected: Expected | None = None

    def publish(self, model: GlobalModel) -> None:
        """Server side: make ``model`` the answer to every following :meth:`receive`."""
        self.current = model
        self._expected = Expected.of(model.weights, round=model.round + 1)

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
            instructions=dict(self.current.instructions),
        )

    def send(self, update: ModelUpdate) -> None:
        sender = update.site  # the site whose handler sends (what the bytes claim is checked against it)
        if sender in self.inbox or sender in self.rejected:
            raise RuntimeError(f"{sender} sent two updates in round {update.round}.")
        if self.tamper is not None:
            update = self.tamper(update)
        data = encode_update(update)
        if self.tamper_bytes is not None:
            data = self.tamper_bytes(update, data)
        self.wire_bytes[sender] = len(data)
        expect = None if self._expected is None else dataclasses.replace(self._expected, site=sender)
        try:
            self.inbox[sender] = decode_update(data, expect)
        except Exception as exc:  # noqa: BLE001 - whatever the bytes do, it is the sender's rejection
            self.rejected[sender] = f"undecodable update: {exc if isinstance(exc, UpdateError) else repr(exc)}"

    def has_update(self, site: str) -> bool:
        """Whether ``site`` has sent its update of the current round (decodable or not)."""
        return site in self.inbox or site in self.rejected

    def take_rejected(self) -> dict[str, str]:
        """Server side: ``{site: reason}`` for the bytes of this round that did not decode; empties the list."""
        rejected, self.rejected = self.rejected, {}
        return rejected

    def collect(self) -> list[ModelUpdate]:
        """Server side: the updates received this round, in arrival order; empties the inbox."""
        updates = list(self.inbox.values())
        self.inbox = {}
        return updates
