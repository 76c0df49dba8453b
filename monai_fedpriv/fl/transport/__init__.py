"""How updates travel between sites and the server: the :class:`Transport` interface and its in-process
implementation. Aggregation never lives in a transport (:mod:`monai_fedpriv.fl.strategies`)."""

from monai_fedpriv.fl.transport.base import Transport
from monai_fedpriv.fl.transport.inprocess import InProcessTransport

__all__ = ["InProcessTransport", "Transport"]
