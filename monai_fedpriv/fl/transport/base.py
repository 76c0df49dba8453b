"""How updates travel. Transports move :class:`ModelUpdate` / :class:`GlobalModel` objects and nothing else.

Two implementations share this interface:

* :class:`~monai_fedpriv.fl.transport.inprocess.InProcessTransport`: the default, N sites simulated in one process.
  A site that has sent its update hands control back to the simulator (``yields_control = True``): the
  :class:`~monai_fedpriv.handlers.FederatedSync` handler interrupts the Ignite engine, the simulator aggregates,
  and resumes the engine, which then receives the new global model.
* the NVIDIA FLARE adapter (Client API), where ``receive`` blocks until the server answers.

Aggregation never lives in a transport: see :mod:`monai_fedpriv.fl.aggregation`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from monai_fedpriv.fl.update import GlobalModel, ModelUpdate

__all__ = ["Transport"]


class Transport(ABC):
    """Site-side view of the channel to the server.

    Attributes:
        yields_control: ``True`` when ``send`` does not wait for the server, so the caller must hand control back
            (the in-process simulator); ``False`` when ``receive`` blocks (NVFlare).
    """

    yields_control: bool = False

    @abstractmethod
    def receive(self, site: str) -> GlobalModel:
        """Return the current global model for ``site`` (blocking where the transport is remote); its tensors are
        the caller's own (the transport keeps no reference it could change)."""

    @abstractmethod
    def send(self, update: ModelUpdate) -> None:
        """Deliver ``update`` to the server. Must not modify it."""
