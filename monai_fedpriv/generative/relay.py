"""The server's side of CWT+Replay's generator phase (seed 004, Algorithm 1, lines 22-27): it keeps the generator
and codes the last site returned and hands them to the next. It trusts nothing a site sends beyond its own visit:
the generator must keep the structure it was handed, and the codes must be the earlier sites' codes unchanged,
followed by at most as many new ones as the site has items."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_fedpriv.fl.messages import GeneratorState
from monai_fedpriv.fl.workflow.uploads import ServerTraining

__all__ = ["GeneratorRelay"]


def _shapes(weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in weights.items()}


class GeneratorRelay(ServerTraining):
    """The generator in transit between sites.

    Args:
        max_new: ``{site: most items it may add}`` (what the site holds, as the server knows it).
        seed: the run seed (the generator's initialisation and every site's replay draws derive from it).
    """

    def __init__(self, max_new: Mapping[str, int], seed: int = 0, reference: Any = None) -> None:
        self.max_new = dict(max_new)
        self.seed = int(seed)
        #: the generator every visit must return the structure of (``None``: the first visit's sets it)
        self.shapes = None if reference is None else _shapes(reference.state_dict())
        self.num_embeddings = None if reference is None else int(reference.num_embeddings)
        self.current: GeneratorState | None = None

    def screen(self, uploads: Sequence[Any], asked: Sequence[str], rnd: int) -> tuple[list[Any], dict[str, str]]:
        accepted: list[Any] = []
        rejected: dict[str, str] = {}
        for up in uploads:
            problem = self._problem(up, asked, rnd, accepted)
            if problem is None:
                accepted.append(up)
            else:
                rejected[up.site] = f"generator from {up.site!r} (round {rnd}) rejected: {problem}"
        return accepted, rejected

    def _problem(self, up: Any, asked: Sequence[str], rnd: int, accepted: list[Any]) -> str | None:
        if not isinstance(up, GeneratorState):
            return f"it sent a {type(up).__name__}, not a generator"
        if up.site not in asked or accepted:
            return "it was not the one site asked for the generator this round"
        if up.round != rnd:
            return f"its generator is of round {up.round}, not {rnd}"
        old = self.current
        n_old = 0 if old is None else old.items
        shapes = self.shapes or (None if old is None else _shapes(old.weights))
        if shapes is not None and _shapes(up.weights) != shapes:
            return "its generator's structure differs from the one the server hands out"
        if self.num_embeddings is not None and up.codes.numel() and int(up.codes.max()) >= self.num_embeddings:
            return f"its codes reach {int(up.codes.max())}, past the codebook's {self.num_embeddings} entries"
        if not 0 < up.items - n_old <= self.max_new.get(up.site, 0):
            return f"it added {up.items - n_old} codes, not 1 to {self.max_new.get(up.site, 0)}"
        if old is not None:
            if tuple(up.codes.shape[1:]) != tuple(old.codes.shape[1:]) or not torch.equal(up.codes[:n_old], old.codes):
                return "the earlier sites' codes were changed"
        return None

    def facts(self, upload: Any, wire_bytes: int | None) -> dict[str, Any]:
        return {"kind": upload.kind, "round": upload.round, "items": upload.items,
                "item_shape": list(upload.codes.shape[1:]),
                "bytes": int(wire_bytes if wire_bytes is not None else upload.nbytes()),
                "protected": False, "privacy": None}  # fmt: skip

    def receive(self, uploads: Sequence[Any]) -> None:
        for up in uploads:
            self.current = up

    def train(self, rnd: int, weights: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise RuntimeError("CWT+Replay trains nothing at the server.")

    def state_dict(self) -> dict[str, Any]:
        cur = self.current
        return {} if cur is None else {"site": cur.site, "round": cur.round, "weights": cur.weights,
                                       "codes": cur.codes}  # fmt: skip

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.current = None if not state else GeneratorState(state["site"], int(state["round"]),
                                                             dict(state["weights"]), state["codes"])  # fmt: skip
