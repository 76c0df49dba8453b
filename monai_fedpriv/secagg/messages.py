"""The four stages' messages of secure aggregation (Bonawitz et al. 2017, Fig. 4) and their sizes on the wire.

Every message names its session, round and sender; a party refuses one of another session, round or stage, a
second one from the same sender, or one from a site outside the round (:func:`check_message`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monai_fedpriv.secagg.session import Session

__all__ = ["Advert", "MaskedInput", "SharePackets", "UnmaskRequest", "UnmaskShares", "check_message", "wire_bytes"]

SHARE_BYTES = 66  # one Shamir share: a 521-bit field element
HEADER_BYTES = 48  # session id, round, stage, sender


@dataclass(frozen=True)
class Advert:
    """Stage 0, site -> server -> all: the site's two public keys (for encryption and for masks)."""

    site: str
    session_id: str
    round: int
    c_pk: bytes
    s_pk: bytes


@dataclass(frozen=True)
class SharePackets:
    """Stage 1, site -> server (-> each receiver): shares of the site's mask key and self-mask seed, one sealed
    packet per neighbour; the server can read none of them."""

    site: str
    session_id: str
    round: int
    packets: dict[str, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, site -> server: the site's integer vector plus its self mask and pairwise masks, mod ``2^bits``."""

    site: str
    session_id: str
    round: int
    values: np.ndarray


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, server -> surviving sites: who sent a masked input (their self masks are removed) and who dropped
    after sharing (their pairwise masks are removed). Public; no site is in both."""

    session_id: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class UnmaskShares:
    """Stage 3, site -> server: for each survivor among its neighbours the share of its self-mask seed, for each
    dropped one the share of its mask key; never both kinds for one site."""

    site: str
    session_id: str
    round: int
    self_mask: dict[str, int]
    keys: dict[str, int]


Message = Advert | SharePackets | MaskedInput | UnmaskShares


def check_message(message: Message, session: Session, kind: type, seen: set[str]) -> None:
    """Refuse a message of another kind, session or round, from a site outside the round, or a repeat.

    Raises:
        ValueError: naming the sender and what is wrong.
    """
    sender = getattr(message, "site", "?")
    if not isinstance(message, kind):
        raise ValueError(f"{sender}: a {type(message).__name__} where the protocol expects a {kind.__name__}.")
    if message.session_id != session.session_id or message.round != session.round:
        raise ValueError(f"{sender}: a {kind.__name__} of session {message.session_id[:8]} round {message.round}, "
                         f"not of this round's ({session.round}): replayed or stale.")  # fmt: skip
    if sender not in session.sites:
        raise ValueError(f"{sender!r} is not a site of round {session.round}.")
    if sender in seen:
        raise ValueError(f"{sender}: a second {kind.__name__} in round {session.round} (replayed).")


def wire_bytes(message: Message | UnmaskRequest, bits: int) -> int:
    """What ``message`` takes on the wire: fixed fields plus keys, packets, packed integers or shares."""
    if isinstance(message, Advert):
        return HEADER_BYTES + len(message.c_pk) + len(message.s_pk)
    if isinstance(message, SharePackets):
        return HEADER_BYTES + sum(len(p) + 16 for p in message.packets.values())
    if isinstance(message, MaskedInput):
        return HEADER_BYTES + int(message.values.size) * packed_width(bits)
    if isinstance(message, UnmaskRequest):
        return HEADER_BYTES + 16 * (len(message.survivors) + len(message.dropped))
    return HEADER_BYTES + (SHARE_BYTES + 16) * (len(message.self_mask) + len(message.keys))


def packed_width(bits: int) -> int:
    """Bytes per coordinate of a masked vector: the smallest of 1, 2, 4, 8 that holds ``bits``."""
    return next(w for w in (1, 2, 4, 8) if bits <= 8 * w)


def to_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers (any sign) as ``uint64`` residues mod ``2^bits``."""
    return (np.asarray(values, dtype=np.int64).astype(np.uint64)) & np.uint64((1 << bits) - 1)


def from_ring(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues mod ``2^bits`` back to signed integers in ``[-2^(bits-1), 2^(bits-1))``."""
    v = np.asarray(values, dtype=np.uint64).astype(np.int64)
    half = 1 << (bits - 1)
    return np.where(v >= half, v - (1 << bits), v)
