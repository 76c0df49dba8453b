"""Fault injection, to see what a federation's configuration does when a site misbehaves before it is deployed.

``monai-fedpriv simulate ... --inject-fault SITE:KIND:ROUND`` (repeatable):

* ``crash``: the site's trainer raises :class:`~monai_fedpriv.errors.InjectedFault` at the start of that round;
* ``nan``: the update the site sends has NaN in its first floating-point tensor;
* ``scale``: the update's delta is multiplied by 1e6;
* ``keys``: a key of the update is renamed (the server sees one missing and one unknown key);
* ``stall``: the site's trainer sleeps :data:`STALL_SECONDS` at the start of that round (a slow site: exercises
  round timeouts and, in deployment tests, leaves time to kill a process mid-round). Results are unchanged;
* ``overclaim``: the update claims ``local_steps = 10**12`` with its honest delta (a site trying to take over a
  step-weighted average; the server bounds work claims);
* ``drop-before-send`` / ``drop-after-send`` (``--secure-aggregation`` only): the site shares its keys, then drops
  out before sending its masked input, or after it (before the unmasking stage);
* ``bytes``: the site sends malformed bytes instead of its encoded update: a valid prefix and header whose one tensor
  claims the shape ``[2**40, 2**40]`` (an element count that overflows int64) and no values, which the decoder
  before issue 16 let out of the round as a ``RuntimeError``.

``nan``, ``scale``, ``keys`` and ``overclaim`` act on the update the site sends, ``bytes`` on its encoding, both after
the site's filters (a buggy or malicious site, never a privacy path), so they exercise the server's decoding and
screening; ``crash`` exercises the recovery of a site whose training failed.
A ``crash`` or ``stall`` happens once per process: a site process started again (a resumed job) repeats it.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from ignite.engine import Engine, Events

from monai_fedpriv.errors import InjectedFault
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.fl.wire import CODEC_VERSION, MAGIC

__all__ = ["DROP_KINDS", "FAULT_KINDS", "STALL_SECONDS", "Fault", "FaultInjector", "parse_fault"]

FAULT_KINDS = ("nan", "crash", "scale", "keys", "stall", "overclaim", "bytes", "drop-before-send", "drop-after-send")
#: secure aggregation only: a site that shares its keys and then vanishes, before or after sending its masked input
DROP_KINDS = ("drop-before-send", "drop-after-send")
STALL_SECONDS = 10.0
OVERCLAIM_STEPS = 10**12


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind`` at ``site`` in 1-based ``round``."""

    site: str
    kind: str
    round: int

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"--inject-fault: kind {self.kind!r} is not one of {FAULT_KINDS}.")
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 1:
            raise ValueError(f"--inject-fault: round must be an int >= 1, got {self.round!r}.")

    def __str__(self) -> str:
        return f"{self.site}:{self.kind}:{self.round}"


def parse_fault(text: str) -> Fault:
    """``"site-2:nan:3"`` -> ``Fault("site-2", "nan", 3)`` (``ValueError`` naming the flag on bad input)."""
    parts = text.split(":")
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"--inject-fault expects SITE:KIND:ROUND (e.g. site-2:nan:3), got {text!r}.")
    site, kind, rnd = parts
    try:
        number = int(rnd)
    except ValueError:
        raise ValueError(f"--inject-fault {text!r}: round {rnd!r} is not an integer.") from None
    return Fault(site, kind, number)


class FaultInjector:
    """Applies a run's faults: ``tamper`` for the update a site sends, ``tamper_bytes`` for its encoding, ``attach``
    for trainer crashes and stalls."""

    def __init__(self, faults: Iterable[Fault] = ()) -> None:
        self.faults = list(faults)

    def check_sites(self, sites: Sequence[str]) -> None:
        unknown = sorted({f.site for f in self.faults} - set(sites))
        if unknown:
            raise ValueError(f"--inject-fault names sites {unknown} that are not in this run ({list(sites)}).")

    def _find(self, site: str, rnd: int, kinds: tuple[str, ...]) -> Fault | None:
        return next((f for f in self.faults if f.site == site and f.round == rnd and f.kind in kinds), None)

    def drops(self, rnd: int) -> dict[str, str]:
        """``{site: "drop-before-send" | "drop-after-send"}`` due in round ``rnd``."""
        return {f.site: f.kind for f in self.faults if f.round == rnd and f.kind in DROP_KINDS}

    def tamper(self, update: ModelUpdate) -> ModelUpdate:
        """The update as a faulty site would send it (unchanged when no fault is due)."""
        fault = self._find(update.site, update.round, ("nan", "scale", "keys", "overclaim"))
        if fault is None:
            return update
        if fault.kind == "overclaim":
            return dataclasses.replace(update, local_steps=OVERCLAIM_STEPS)
        delta = {k: v.clone() for k, v in update.delta.items()}
        if fault.kind == "nan":
            key = next(k for k, v in delta.items() if v.is_floating_point())
            delta[key].view(-1)[0] = float("nan")
        elif fault.kind == "scale":
            delta = {k: v * 1e6 if v.is_floating_point() else v for k, v in delta.items()}
        else:
            key = next(iter(delta))
            delta[key + ".injected"] = delta.pop(key)
        masks = update.masks
        if fault.kind == "keys" and masks is not None:
            masks = {(k + ".injected" if k == next(iter(update.delta)) else k): m for k, m in masks.items()}
        return dataclasses.replace(update, delta=delta, masks=masks)

    def tamper_bytes(self, update: ModelUpdate, data: bytes) -> bytes:
        """The bytes a faulty site sends for the encoded ``update`` (``data`` unchanged when no ``bytes`` fault is
        due): a header whose one tensor has an overflowing shape and no values."""
        if self._find(update.site, update.round, ("bytes",)) is None:
            return data
        key = next(iter(update.delta), "weight")
        header = {
            "site": update.site, "round": update.round, "n_samples": update.n_samples, "local_steps": 1,
            "sparse": False, "optimizer_state": None, "meta": {},
            "tensors": [{"key": key, "shape": [2**40, 2**40], "dtype": "float32", "encoding": "dense",
                         "pos_bytes": 0, "val_bytes": 0}],
        }  # fmt: skip
        head = zlib.compress(json.dumps(header).encode("utf-8"))
        return struct.pack("<4sBI", MAGIC, CODEC_VERSION, len(head)) + head

    def attach(self, site: str, engine: Engine, current_round: Callable[[], int]) -> None:
        """Make ``site``'s trainer raise (``crash``) or sleep (``stall``) at the start of each round with such a fault.

        Args:
            current_round: returns the round the site is training (1-based).
        """
        due = {(f.round, f.kind) for f in self.faults if f.site == site and f.kind in ("crash", "stall")}
        if not due:
            return

        def act(_: Engine) -> None:
            rnd = current_round()
            if (rnd, "stall") in due:
                due.discard((rnd, "stall"))
                time.sleep(STALL_SECONDS)
            if (rnd, "crash") in due:
                due.discard((rnd, "crash"))  # a crash happens once: the site recovers in the next round
                raise InjectedFault(f"{site}: injected crash in round {rnd}")

        engine.add_event_handler(Events.ITERATION_STARTED, act)
