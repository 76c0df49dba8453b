"""Save what a private training run produced, and never leave an older model looking like its result.

A bundle run on its own (``python -m monai.bundle run`` with ``dp.json``) may stop early because its privacy
budget ran out, before the bundle's key-metric checkpoint ever fires. Without this handler the run would end with
no model and an older (maybe non-private) ``models/model.pt`` still in place. With it:

* at the start of the run, a ``model.pt`` left by an earlier run is renamed ``model.previous-<time>.pt`` (logged);
* at the end (completed, or stopped by the budget), the last private model is saved as ``model_last.pt``, and as
  ``model.pt`` too when the bundle's own checkpoint did not write one during this run;
* ``privacy.json`` beside it says what protects the weights: epsilon, delta, budget, the privacy unit, where the
  noise came from and why training stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events
from torch import nn

from monai_fedpriv.fl.weights import exchangeable_state
from monai_fedpriv.handlers.privacy_budget import epoch_logger
from monai_fedpriv.utils.files import atomic_torch_save, write_json

__all__ = ["PrivateModelSaver"]

logger = logging.getLogger("monai_fedpriv.privacy")


class PrivateModelSaver:
    """Ignite handler: set aside an earlier run's model at start, save the last private model at the end.

    Args:
        save_dir: the bundle's ``ckpt_dir``.
        network: the trained network (the plain module; wrapper prefixes are stripped anyway).
        reporters: objects with ``privacy_facts()`` (the site's budget handler, DP-SGD) whose facts go into
            ``privacy.json``.
        filename: the bundle's model file name.
        log: print where the model went (the simulator turns it off).
    """

    def __init__(
        self,
        save_dir: str | Path,
        network: nn.Module,
        reporters: Sequence[Any] = (),
        filename: str = "model.pt",
        log: bool = True,
    ) -> None:
        self.save_dir = Path(save_dir)
        self.network = network
        self.reporters = list(reporters)
        self.filename = filename
        self.log = bool(log)
        self._started_at: float | None = None

    def attach(self, engine: Engine) -> None:
        if engine.has_event_handler(self._set_aside, Events.STARTED):
            return
        engine.add_event_handler(Events.STARTED, self._set_aside)
        engine.add_event_handler(Events.COMPLETED, self._save)

    @property
    def model_path(self) -> Path:
        return self.save_dir / self.filename

    def _set_aside(self, engine: Engine) -> None:
        if self._started_at is not None:  # a resumed engine (the simulator's rounds): same run
            return
        self._started_at = time.time()
        if self.model_path.is_file():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(self.model_path.stat().st_mtime))
            previous = self.model_path.with_name(f"{self.model_path.stem}.previous-{stamp}{self.model_path.suffix}")
            self.model_path.rename(previous)
            logger.warning(f"{self.model_path} is from an earlier run: moved to {previous.name}.")

    def _save(self, engine: Engine) -> None:
        weights = exchangeable_state(self.network)
        last = self.save_dir / f"{self.model_path.stem}_last{self.model_path.suffix}"
        atomic_torch_save(weights, last)
        # any model.pt of an earlier run was moved aside at the start: one present now was written by this run
        written_now = self.model_path.is_file() and self._started_at is not None
        if not written_now:
            atomic_torch_save(weights, self.model_path)
        facts: dict[str, Any] = {}
        for reporter in self.reporters:
            facts.update(reporter.privacy_facts())
        record = {
            "model": self.filename,
            "model_is": "the bundle's best checkpoint of this run" if written_now else "the last private model",
            "last_model": last.name,
            "iterations": engine.state.iteration,
            "epochs": engine.state.epoch,
            "privacy": facts,
        }
        write_json(record, self.save_dir / "privacy.json")
        if self.log:
            epoch_logger().info(
                f"private model saved to {self.model_path} ({record['model_is']}); record: privacy.json"
            )
