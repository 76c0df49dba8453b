"""A site's side of one secure sum (Bonawitz et al. 2017, Fig. 4; SecAgg+ neighbours of Bell et al. 2020).

Stages, each answered once and in order: :meth:`advertise` (two fresh X25519 key pairs), :meth:`share_keys` (a fresh
self-mask seed; Shamir shares of it and of the mask key, sealed for each neighbour), :meth:`masked_input` (the
vector plus the self mask plus, for every neighbour still in, the pairwise mask: added when the site comes first in
the session's order, subtracted otherwise, so pairs cancel in the sum) and :meth:`unmask` (a survivor's self-mask
share or a dropped site's key share, never both for one site). Keys and seeds never leave the object except as
shares; nothing here is logged.
"""

from __future__ import annotations

import json
import os

import numpy as np

from monai_fedpriv.secagg import crypto, shamir
from monai_fedpriv.secagg.messages import (
    Advert,
    MaskedInput,
    SharePackets,
    UnmaskRequest,
    UnmaskShares,
    check_message,
)
from monai_fedpriv.secagg.session import Session

__all__ = ["SecAggClient", "pairwise_mask"]


def pairwise_mask(session: Session, private: bytes | object, peer_public: bytes, me: str, other: str,
                  size: int) -> np.ndarray:  # fmt: skip
    """The mask a pair shares: the same for both ends (the pair's label in session order)."""
    first, second = sorted((me, other), key=session.index)
    seed = crypto.agree(private, peer_public, session.label("mask", first, second))  # type: ignore[arg-type]
    return crypto.mask(seed, size, session.bits)


class SecAggClient:
    """One site in one round's secure sum."""

    def __init__(self, site: str, session: Session) -> None:
        if site not in session.sites:
            raise ValueError(f"{site} is not a site of round {session.round}'s secure aggregation.")
        self.site = site
        self.session = session
        self.stage = 0
        self._c = crypto.KeyPair()
        self._s = crypto.KeyPair()
        self._b_seed = b""
        self._peers: dict[str, Advert] = {}
        self._shares: dict[str, tuple[int, int]] = {}  # holder of: {sender: (key share, self-mask share)}
        self._u2: set[str] = set()

    def _next(self, stage: int) -> None:
        if self.stage != stage:
            raise ValueError(f"{self.site}: stage {stage} asked while at stage {self.stage} of round "
                             f"{self.session.round} (out of order or repeated).")  # fmt: skip
        self.stage += 1

    # ------------------------------------------------------------------ stage 0
    def advertise(self) -> Advert:
        self._next(0)
        s = self.session
        return Advert(self.site, s.session_id, s.round, self._c.public, self._s.public)

    # ------------------------------------------------------------------ stage 1
    def share_keys(self, adverts: dict[str, Advert]) -> SharePackets:
        """Shares of this site's mask key and a fresh self-mask seed for itself and every advertised neighbour."""
        self._next(1)
        s, seen = self.session, set[str]()
        for advert in adverts.values():
            check_message(advert, s, Advert, seen)
            seen.add(advert.site)
        self._peers = {v: a for v, a in adverts.items() if v in s.graph[self.site]}
        holders = sorted([self.site, *self._peers], key=s.index)
        if len(holders) < s.threshold:
            raise ValueError(f"{self.site}: only {len(holders) - 1} neighbours advertised keys in round {s.round}; "
                             f"{s.threshold} holders are needed.")  # fmt: skip
        self._b_seed = os.urandom(32)
        index = {v: s.index(v) for v in holders}
        key_shares = shamir.split(int.from_bytes(crypto.private_bytes(self._s.private), "big"), list(index.values()),
                                  s.threshold)  # fmt: skip
        seed_shares = shamir.split(int.from_bytes(self._b_seed, "big"), list(index.values()), s.threshold)
        self._shares[self.site] = (key_shares[index[self.site]], seed_shares[index[self.site]])
        packets = {}
        for v in self._peers:
            plain = json.dumps({"key": key_shares[index[v]], "seed": seed_shares[index[v]]}).encode()
            key = crypto.agree(self._c.private, self._peers[v].c_pk, s.label("share", *sorted((self.site, v))))
            packets[v] = crypto.seal_packet(key, plain, s.label("packet", self.site, v))
        return SharePackets(self.site, s.session_id, s.round, packets)

    # ------------------------------------------------------------------ stage 2
    def masked_input(self, packets: dict[str, bytes], values: np.ndarray) -> MaskedInput:
        """``values`` (integers mod ``2^bits``) masked; ``packets`` are the sealed shares addressed to this site by
        the neighbours that took part in stage 1 (``{sender: packet}``), as the server routed them."""
        self._next(2)
        s = self.session
        for sender, packet in packets.items():
            if sender not in self._peers:
                raise ValueError(f"{self.site}: a share packet from {sender!r}, which is not an advertised neighbour.")
            key = crypto.agree(self._c.private, self._peers[sender].c_pk, s.label("share", *sorted((self.site,
                                                                                                     sender))))
            try:
                plain = json.loads(crypto.open_packet(key, packet, s.label("packet", sender, self.site)))
                self._shares[sender] = (int(plain["key"]), int(plain["seed"]))
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{self.site}: the share packet from {sender} is unusable: {exc}") from None
        self._u2 = set(packets) | {self.site}
        x = np.asarray(values, dtype=np.uint64)
        modulus_mask = np.uint64(s.modulus - 1)
        if x.ndim != 1 or np.any(x > modulus_mask):
            raise ValueError(f"{self.site}: the masked input must be a vector of integers in [0, 2^{s.bits}).")
        y = (x + crypto.mask(self._b_seed, x.size, s.bits)) & modulus_mask
        me = s.index(self.site)
        for v in sorted(self._u2 - {self.site}, key=s.index):
            m = pairwise_mask(s, self._s.private, self._peers[v].s_pk, self.site, v, x.size)
            y = (y + m if me < s.index(v) else y - m) & modulus_mask  # uint64 wraps mod 2^64, 2^bits divides it
        return MaskedInput(self.site, s.session_id, s.round, y)

    # ------------------------------------------------------------------ stage 3
    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """The shares the server needs, after checking its request is consistent with what this site saw."""
        self._next(3)
        s = self.session
        if request.session_id != s.session_id or request.round != s.round:
            raise ValueError(f"{self.site}: an unmask request of another session or round (replayed or stale).")
        survivors, dropped = set(request.survivors), set(request.dropped)
        if survivors & dropped:
            raise ValueError(f"{self.site}: the server asks to unmask {sorted(survivors & dropped)} both as survivor "
                             f"and as dropped: that would reveal their inputs; refused.")  # fmt: skip
        named = (survivors | dropped) & set(self._peers)
        if not named <= self._u2 or self.site not in survivors:
            raise ValueError(f"{self.site}: the unmask request names neighbours that did not share keys with it "
                             f"({sorted(named - self._u2)}), or not itself as a survivor; refused.")  # fmt: skip
        if len(survivors) < s.min_survivors or not s.connected(tuple(survivors)):
            raise ValueError(f"{self.site}: {len(survivors)} survivors (at least {s.min_survivors}, in one connected "
                             f"group, are needed): unmasking would expose them; refused.")  # fmt: skip
        seeds = {v: self._shares[v][1] for v in survivors if v in self._shares}
        keys = {v: self._shares[v][0] for v in dropped if v in self._shares}
        self._b_seed = b""  # this round is over for this site
        return UnmaskShares(self.site, s.session_id, s.round, seeds, keys)
