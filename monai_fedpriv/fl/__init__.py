"""Federated core: update containers and wire format, strategies, the server round, transports and the in-process
simulator.

* :mod:`.update`, :mod:`.codec`, :mod:`.weights`, :mod:`.momentum`: what crosses the wire and how;
* :mod:`.strategies`: select a round's sites and aggregate (FedAvg, FedAvgM, median, trimmed mean);
* :mod:`.server`: the round (screen, aggregate, publish, record), records and the round checkpoint;
* :mod:`.transport`: the transport interface and the in-process transport;
* :mod:`.simulator`: N sites of one bundle in one process, fault injection.
"""

from monai_fedpriv.fl.strategies import FedAvg, FedAvgM, Strategy, build_strategy, weighted_delta
from monai_fedpriv.fl.transport import InProcessTransport, Transport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate, check_update

__all__ = [
    "FedAvg",
    "FedAvgM",
    "GlobalModel",
    "InProcessTransport",
    "ModelUpdate",
    "Strategy",
    "Transport",
    "build_strategy",
    "check_update",
    "weighted_delta",
]
