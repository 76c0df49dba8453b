"""Secure aggregation: the server learns only the sum of the sites' integer vectors (Bonawitz et al. 2017, with
SecAgg+'s sparse neighbour graph of Bell et al. 2020).

``session`` (who takes part, threshold, bit width, neighbour graph), ``shamir`` (t-of-n shares), ``crypto`` (X25519,
HKDF, AES-GCM packets, AES-CTR masks), ``messages`` (the four stages' messages, their checks and sizes), ``client``
and ``server`` (each side's stages), ``protocol`` (one sum in-process, with dropouts), ``wire`` (the messages as
bytes between processes, decoded as hostile input).
"""

from monai_fedpriv.secagg.protocol import SecureSum, secure_sum
from monai_fedpriv.secagg.server import SecAggError, SecAggServer
from monai_fedpriv.secagg.session import Session, default_threshold

__all__ = ["SecAggError", "SecAggServer", "SecureSum", "Session", "default_threshold", "secure_sum"]
