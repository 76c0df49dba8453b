"""One round's secure-aggregation session: who takes part, the threshold, the bit width and who masks with whom.

The neighbour graph is complete (Bonawitz et al. 2017) or, with ``neighbours=k`` (SecAgg+, Bell et al. 2020), each
site pairs with about ``k`` others (``k`` rounded up to an even number): the sites placed on a ring in an order drawn
from the session's public seed, each linked to its ``ceil(k/2)`` nearest on either side. The survivors of a round
must form one connected group of that graph (:meth:`Session.connected`), else the sum is not unmasked. A site's key
and self-mask seed are shared among its neighbours and itself, so the server needs ``threshold`` of them to unmask
it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

__all__ = ["Session", "default_threshold", "neighbour_graph"]


def default_threshold(n_sites: int, neighbours: int | None = None) -> int:
    """A majority of the sites (of a site's neighbourhood, itself included, under SecAgg+), and at least 2."""
    holders = n_sites if neighbours is None else min(n_sites, 2 * math.ceil(neighbours / 2) + 1)
    return max(2, holders // 2 + 1)


def neighbour_graph(sites: tuple[str, ...], neighbours: int | None, seed: int) -> dict[str, frozenset[str]]:
    """``{site: the sites it masks with}``, symmetric; complete when ``neighbours`` is ``None`` or ``>= n - 1``."""
    n = len(sites)
    if neighbours is None or neighbours >= n - 1:
        return {s: frozenset(sites) - {s} for s in sites}
    order = list(sites)
    random.Random(seed).shuffle(order)
    half = max(1, math.ceil(neighbours / 2))
    graph: dict[str, set[str]] = {s: set() for s in sites}
    for i, s in enumerate(order):
        for step in range(1, half + 1):
            for j in (i - step, i + step):
                other = order[j % n]
                if other != s:
                    graph[s].add(other)
                    graph[other].add(s)
    return {s: frozenset(v) for s, v in graph.items()}


@dataclass(frozen=True)
class Session:
    """What every party of one round's secure sum agrees on before it starts (all public).

    Args:
        session_id: random hex naming this key exchange (a resumed run starts a new one).
        round: the federated round.
        sites: the sites asked, in a fixed order; a site's share index is its position + 1.
        threshold: shares needed to recover a secret (``>= 2``); also the fewest survivors that may be unmasked.
        bits: the ring is the integers mod ``2^bits``.
        neighbours: SecAgg+'s ``k`` (``None``: every pair).
        graph_seed: public seed of the neighbour graph.
    """

    session_id: str
    round: int
    sites: tuple[str, ...]
    threshold: int
    bits: int
    neighbours: int | None = None
    graph_seed: int = 0
    graph: dict[str, frozenset[str]] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(set(self.sites)) != len(self.sites) or len(self.sites) < 3:
            raise ValueError(
                f"secure aggregation needs at least 3 distinct sites, got {list(self.sites)}: with two, each site "
                f"learns the other's update from the sum and its own."
            )
        if not 2 <= self.threshold <= len(self.sites):
            raise ValueError(f"--secagg-threshold {self.threshold} must be in [2, {len(self.sites)}] (the sites).")
        if not 2 <= self.bits <= 62:
            raise ValueError(f"--secagg-bits {self.bits} must be in [2, 62].")
        if self.neighbours is not None and not 2 <= self.neighbours:
            raise ValueError(f"--secagg-neighbours {self.neighbours} must be >= 2.")
        graph = neighbour_graph(self.sites, self.neighbours, self.graph_seed)
        small = [s for s, nb in graph.items() if len(nb) + 1 < self.threshold]
        if small:
            raise ValueError(
                f"--secagg-threshold {self.threshold} exceeds what {small[0]}'s {len(graph[small[0]])} neighbours and "
                f"itself can hold: raise --secagg-neighbours or lower the threshold."
            )
        object.__setattr__(self, "graph", graph)

    @property
    def min_survivors(self) -> int:
        """The fewest sites whose sum may be unmasked: the threshold, and never fewer than 3 (with two, each learns
        the other's input from the sum and its own)."""
        return max(3, self.threshold)

    def connected(self, survivors: tuple[str, ...] | list[str]) -> bool:
        """Whether the survivors form one group in the neighbour graph: with SecAgg+ a server could otherwise remove
        the masks inside each group separately and learn each group's sum."""
        left = set(survivors)
        if not left:
            return False
        stack = [next(iter(left))]
        seen = {stack[0]}
        while stack:
            for other in self.graph[stack.pop()] & left:
                if other not in seen:
                    seen.add(other)
                    stack.append(other)
        return seen == left

    def index(self, site: str) -> int:
        return self.sites.index(site) + 1

    def label(self, use: str, *parties: str) -> str:
        """The HKDF label / associated data of ``use`` between ``parties`` in this session and round."""
        return "|".join(["monai_fedpriv-secagg", use, self.session_id, str(self.round), *parties])

    @property
    def modulus(self) -> int:
        return 1 << self.bits
