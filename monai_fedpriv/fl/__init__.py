"""Federated core: update containers, aggregation strategies, transports and the in-process simulator."""

from monai_fedpriv.fl.aggregation import Aggregator, FedAvg, FedAvgM, weighted_delta
from monai_fedpriv.fl.inprocess import InProcessTransport
from monai_fedpriv.fl.transport import Transport
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate, check_update

__all__ = [
    "Aggregator",
    "FedAvg",
    "FedAvgM",
    "GlobalModel",
    "InProcessTransport",
    "ModelUpdate",
    "Transport",
    "check_update",
    "weighted_delta",
]
