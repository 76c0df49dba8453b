"""The server's side of one secure sum: it routes, counts and unmasks, and learns only the sum.

It keeps every message it receives in :attr:`SecAggServer.received` (what a curious server holds; the tests read
it). A stage with fewer than ``threshold`` participants ends the sum with :class:`SecAggError` (the round fails
cleanly: nothing was aggregated). For a site that dropped after sharing its keys, the server asks the survivors for
shares of its mask key and removes the masks the survivors paired with it; for a survivor, shares of its self-mask
seed. It never asks for both for one site.
"""

from __future__ import annotations

import numpy as np

from monai_fedpriv.secagg import crypto, shamir
from monai_fedpriv.secagg.client import pairwise_mask
from monai_fedpriv.secagg.messages import (
    Advert,
    MaskedInput,
    SharePackets,
    UnmaskRequest,
    UnmaskShares,
    check_message,
)
from monai_fedpriv.secagg.session import Session

__all__ = ["SecAggError", "SecAggServer"]


class SecAggError(RuntimeError):
    """A secure sum could not be completed (too few sites at a stage, too few shares); the round fails cleanly."""


class SecAggServer:
    """One round's secure sum at the server."""

    def __init__(self, session: Session, size: int) -> None:
        self.session = session
        self.size = int(size)
        self.received: list[object] = []
        self.adverts: dict[str, Advert] = {}
        self.shared: set[str] = set()
        self.inputs: dict[str, np.ndarray] = {}
        self.request: UnmaskRequest | None = None
        self.routed_pairs: set[tuple[str, str]] = set()  # (sender, receiver) of every share packet passed on

    def _enough(self, who: set[str] | dict, stage: str, least: int | None = None) -> None:
        least = self.session.threshold if least is None else least
        if len(who) < least:
            raise SecAggError(f"round {self.session.round}: {len(who)} site(s) reached the {stage} stage of secure "
                              f"aggregation, fewer than the threshold {least}; nothing was aggregated.")  # fmt: skip

    def collect_adverts(self, adverts: list[Advert]) -> dict[str, Advert]:
        """Stage 0: the advertised keys, to be sent to every site (refused messages are left out)."""
        for advert in adverts:
            check_message(advert, self.session, Advert, set(self.adverts))
            if len(advert.c_pk) != 32 or len(advert.s_pk) != 32:
                raise ValueError(f"{advert.site}: public keys of {len(advert.c_pk)} and {len(advert.s_pk)} bytes.")
            self.received.append(advert)
            self.adverts[advert.site] = advert
        self._enough(self.adverts, "key advertising")
        return dict(self.adverts)

    def route(self, sent: list[SharePackets]) -> dict[str, dict[str, bytes]]:
        """Stage 1: each site's sealed packets to their receivers (``{receiver: {sender: packet}}``)."""
        routed: dict[str, dict[str, bytes]] = {v: {} for v in self.adverts}
        for message in sent:
            check_message(message, self.session, SharePackets, self.shared)
            if message.site not in self.adverts:
                raise ValueError(f"{message.site}: shares keys it never advertised.")
            self.received.append(message)
            self.shared.add(message.site)
            for receiver, packet in message.packets.items():
                if receiver in routed and receiver in self.session.graph[message.site]:
                    routed[receiver][message.site] = packet
                    self.routed_pairs.add((message.site, receiver))
        self._enough(self.shared, "key sharing")
        return {v: {u: p for u, p in packets.items()} for v, packets in routed.items() if v in self.shared}

    def collect_inputs(self, inputs: list[MaskedInput]) -> UnmaskRequest:
        """Stage 2: the masked vectors; returns the unmask request (survivors and dropped-after-sharing)."""
        for message in inputs:
            check_message(message, self.session, MaskedInput, set(self.inputs))
            if message.site not in self.shared:
                raise ValueError(f"{message.site}: a masked input from a site that did not share its keys.")
            values = np.asarray(message.values)
            if values.dtype != np.uint64 or values.shape != (self.size,) or np.any(values >> self.session.bits):
                raise ValueError(f"{message.site}: a masked input of {values.dtype} {values.shape}, not {self.size} "
                                 f"integers below 2^{self.session.bits}.")  # fmt: skip
            self.received.append(message)
            self.inputs[message.site] = values
        self._enough(set(self.inputs), "masked input", self.session.min_survivors)
        order = self.session.index
        survivors = tuple(sorted(self.inputs, key=order))
        if not self.session.connected(survivors):
            raise SecAggError(f"round {self.session.round}: the sites that sent their masked input do not form one "
                              f"connected group of the neighbour graph; unmasking would reveal each group's sum. "
                              f"Nothing was aggregated (raise --secagg-neighbours).")  # fmt: skip
        dropped = tuple(sorted(self.shared - set(self.inputs), key=order))
        self.request = UnmaskRequest(self.session.session_id, self.session.round, survivors, dropped)
        return self.request

    def unmask(self, answers: list[UnmaskShares]) -> np.ndarray:
        """Stage 3: the sum of the survivors' vectors mod ``2^bits`` from the survivors' shares.

        Raises:
            SecAggError: fewer than ``threshold`` answers, or too few shares for one site's secret.
        """
        assert self.request is not None, "unmask before collect_inputs"
        s, seen = self.session, set[str]()
        key_shares: dict[str, list[tuple[int, int]]] = {v: [] for v in self.request.dropped}
        seed_shares: dict[str, list[tuple[int, int]]] = {v: [] for v in self.request.survivors}
        for answer in answers:
            check_message(answer, s, UnmaskShares, seen)
            if answer.site not in self.request.survivors:
                raise ValueError(f"{answer.site}: unmask shares from a site that is not a survivor.")
            if set(answer.keys) - set(self.request.dropped) or set(answer.self_mask) - set(self.request.survivors):
                raise ValueError(f"{answer.site}: shares for sites the request did not name.")
            seen.add(answer.site)
            self.received.append(answer)
            x = s.index(answer.site)
            for v, y in answer.keys.items():
                key_shares[v].append((x, int(y)))
            for v, y in answer.self_mask.items():
                seed_shares[v].append((x, int(y)))
        self._enough(seen, "unmasking")
        modulus_mask = np.uint64(s.modulus - 1)
        total = np.zeros(self.size, dtype=np.uint64)
        for values in self.inputs.values():
            total = (total + values) & modulus_mask
        for v, shares in seed_shares.items():
            seed = self._secret(v, shares, "self-mask seed").to_bytes(32, "big")
            total = (total - crypto.mask(seed, self.size, s.bits)) & modulus_mask
        for v, shares in key_shares.items():  # a site that shared keys but sent no input: its pairs' masks remain
            key = self._secret(v, shares, "mask key").to_bytes(32, "big")
            for u in self.request.survivors:
                if (v, u) in self.routed_pairs:  # u masked with v exactly when it was handed v's shares
                    m = pairwise_mask(s, key, self.adverts[u].s_pk, v, u, self.size)
                    total = (total - m if s.index(u) < s.index(v) else total + m) & modulus_mask
        return total

    def _secret(self, site: str, shares: list[tuple[int, int]], what: str) -> int:
        if len(shares) < self.session.threshold:
            raise SecAggError(f"round {self.session.round}: {len(shares)} share(s) of {site}'s {what}, fewer than "
                              f"the threshold {self.session.threshold}; the sum cannot be unmasked.")  # fmt: skip
        secret = shamir.combine(shares[: self.session.threshold])
        if secret >= 2**256:
            raise SecAggError(f"round {self.session.round}: the shares of {site}'s {what} do not agree.")
        return secret
