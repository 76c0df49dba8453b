"""Random state that belongs to one owner (a simulated site) instead of to the process.

Layers such as dropout draw from PyTorch's global generator. In the in-process simulator every site runs in the
same process, so without care one site's dropout would depend on how many draws the others made, and a resumed run
(whose global generator starts afresh) would draw differently. :class:`OwnedRandomState` gives each site its own
copy of the global generators (PyTorch CPU and CUDA, NumPy, Python's ``random``), swapped in while the site runs and
saved in its checkpoint, so every draw that shapes training is a function of the config and is restored on resume.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["OwnedRandomState"]


class OwnedRandomState:
    """The global random state of one owner, activated around the code that owns it.

    Args:
        seed: initial seed of every generator.

    Example::

        rng = OwnedRandomState(derive_seed(seed, "rng", "site-1"))
        with rng.active():
            trainer.run()   # dropout draws from site-1's own stream
        state = rng.state_dict()
    """

    def __init__(self, seed: int) -> None:
        with self._isolated():
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)
            random.seed(seed)
            self._state = self._capture()

    @staticmethod
    def _capture() -> dict[str, Any]:
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    @staticmethod
    def _restore(state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])

    @classmethod
    @contextlib.contextmanager
    def _isolated(cls) -> Iterator[None]:
        outer = cls._capture()
        try:
            yield
        finally:
            cls._restore(outer)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Run a block with this owner's state as the global state; keep what the block drew, restore the rest."""
        with self._isolated():
            self._restore(self._state)
            try:
                yield
            finally:
                self._state = self._capture()

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("torch", "numpy", "python"):
            if key not in state:
                raise KeyError(f"random state lacks required key {key!r}.")
        self._state = dict(state)
