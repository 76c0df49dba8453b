"""Secure aggregation in the run loop: the settings and their refusals (``settings``), and a round's updates as one
secure sum over the in-process sites (``gather``). The cryptography lives in :mod:`monai_fedpriv.secagg`."""

from monai_fedpriv.fl.secure.gather import HeldTransport, SecureGather, SecureOutcome, SecureRound
from monai_fedpriv.fl.secure.settings import SECURE_STRATEGIES, SecureAggregation

__all__ = [
    "SECURE_STRATEGIES", "HeldTransport", "SecureAggregation", "SecureGather", "SecureOutcome", "SecureRound",
]  # fmt: skip
