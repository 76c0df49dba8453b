"""A run's tracker: what of ``metrics.json`` is new goes to MLflow or TensorBoard, once.

The tracker is fed the whole ``metrics.json`` whenever it changes (after every round in-process; whenever the
controller's copy changes under NVIDIA FLARE) and logs what it has not logged yet: a round's scalars when the round
completes, a score that arrives a round later (FLARE's sites score each global model with their next answer) when it
arrives. What was logged is kept in ``DIR/tracking.json`` next to ``metrics.json``, so ``--resume`` continues the same
MLflow run (or event folder) without logging a round twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from monai_fedpriv.tracking.series import baseline_scalars, round_scalars, round_texts, run_params
from monai_fedpriv.utils.files import write_json

__all__ = ["Backend", "RunTracker", "STATE_FILE"]

logger = logging.getLogger("monai_fedpriv.tracking")

STATE_FILE = "tracking.json"


class Backend(Protocol):
    """Where the values go (:mod:`~monai_fedpriv.tracking.backends`)."""

    name: str

    def describe(self) -> dict[str, Any]: ...

    def params(self, params: Mapping[str, str]) -> None: ...

    def scalars(self, step: int, values: Mapping[str, float]) -> None: ...

    def texts(self, step: int, texts: Mapping[str, str]) -> None: ...

    def artifacts(self, paths: Iterable[tuple[Path, str]]) -> None: ...

    def close(self, status: str) -> None: ...


class RunTracker:
    """Feeds a :class:`Backend` from ``metrics.json``.

    Args:
        backend: the open backend.
        folder: the run's folder (``tracking.json`` goes there).
        state: what an earlier part of this run logged (from ``tracking.json``), or ``None``.
    """

    def __init__(self, backend: Backend, folder: Path, state: Mapping[str, Any] | None = None) -> None:
        self.backend = backend
        self.folder = Path(folder)
        state = dict(state or {})
        self.logged: dict[int, set[str]] = {int(k): set(v) for k, v in (state.get("logged") or {}).items()}
        self.params: dict[str, str] = dict(state.get("params") or {})
        self._save()  # a run that fails before its first round still resumes this tracker's run

    def update(self, metrics: Mapping[str, Any]) -> None:
        """Log what is new in ``metrics`` (a ``metrics.json``); a failure to log is a warning, never the run's end."""
        self._guarded("the run's settings", self._settings, run_params(metrics))
        rounds = [(int(r["round"]), r) for r in metrics.get("rounds") or [] if isinstance(r, Mapping) and "round" in r]
        for step, record in rounds:  # one round that cannot be logged never keeps the later ones out
            self._guarded(f"round {step}", self._log, step, round_scalars(record), round_texts(record))
        for step, values in baseline_scalars(metrics).items():
            self._guarded("the baselines", self._log, step, values, {})
        self._guarded("tracking.json", self._save)

    def _guarded(self, what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001 - tracking watches a run; it must not stop one
            logger.warning(f"{self.backend.name}: could not log {what}: {type(exc).__name__}: {exc}"[:400])

    def _settings(self, params: Mapping[str, str]) -> None:
        """Settings not logged yet (a cyclic run's sites report theirs in later rounds); a value that changed on
        ``--resume`` (``--rounds``) is logged by the backend as a change."""
        new = {k: v for k, v in params.items() if self.params.get(k) != v}
        if new:
            self.backend.params(new)
            self.params.update(new)

    def log_once(self, step: int, values: Mapping[str, float], texts: Mapping[str, str] | None = None,
                 params: Mapping[str, str] | None = None) -> None:  # fmt: skip
        """Log settings, values and texts of ``step`` that were not logged before (a summary that a rerun repeats);
        failures are warnings."""
        self._guarded("the settings", self._settings, params or {})
        self._guarded(f"step {step}", self._log, int(step), values, texts or {})
        self._guarded("tracking.json", self._save)

    def _log(self, step: int, values: Mapping[str, float], texts: Mapping[str, str]) -> None:
        done = self.logged.setdefault(step, set())
        new = {k: v for k, v in values.items() if k not in done}
        new_texts = {k: v for k, v in texts.items() if f"text:{k}" not in done}
        if new:
            self.backend.scalars(step, new)
        if new_texts:
            self.backend.texts(step, new_texts)
        done.update(new)
        done.update(f"text:{k}" for k in new_texts)

    def finish(self, metrics: Mapping[str, Any], artifacts: Iterable[tuple[Path, str]] = (), status: str = "FINISHED"
               ) -> None:  # fmt: skip
        """Log what is new, the artifacts (``(path, folder in the run)``, missing files skipped) and end the run."""
        self.update(metrics)
        try:
            self.backend.artifacts([(Path(p), where) for p, where in artifacts if Path(p).is_file()])
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"{self.backend.name}: could not store the run's files: {type(exc).__name__}: {exc}"[:400])
        self.close(status)

    def close(self, status: str = "FINISHED") -> None:
        try:
            self.backend.close(status)
        except Exception as exc:  # noqa: BLE001
            logger.warning(f"{self.backend.name}: could not close the run: {type(exc).__name__}: {exc}"[:400])

    def _save(self) -> None:
        state = {
            **self.backend.describe(),
            "params": dict(sorted(self.params.items())),
            "logged": {str(step): sorted(tags) for step, tags in sorted(self.logged.items())},
        }
        write_json(state, self.folder / STATE_FILE)

    @staticmethod
    def saved_state(folder: Path, backend: str) -> dict[str, Any] | None:
        """What an earlier part of the run in ``folder`` logged to ``backend`` (``None``: nothing, or another
        backend's)."""
        path = Path(folder) / STATE_FILE
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None
        return state if isinstance(state, dict) and state.get("backend") == backend else None
