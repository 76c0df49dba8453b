"""The in-process simulator: N sites from one bundle in one process (:mod:`.simulator`), how each site is built,
saved and recovered (:mod:`.site`), and fault injection (:mod:`.faults`)."""

from monai_fedpriv.fl.simulator.faults import FAULT_KINDS, Fault, FaultInjector, parse_fault
from monai_fedpriv.fl.simulator.simulator import FederatedSimulator, LocalWork
from monai_fedpriv.fl.simulator.site import SiteRuntime, SiteSpec, build_site

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultInjector",
    "FederatedSimulator",
    "LocalWork",
    "SiteRuntime",
    "SiteSpec",
    "build_site",
    "parse_fault",
]
