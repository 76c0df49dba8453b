"""MLflow and TensorBoard as tracker backends, and :func:`open_tracker`.

Default stores are local, under the run's folder: MLflow's SQLite store ``DIR/mlruns.db`` with artifacts in
``DIR/mlruns/`` (MLflow 3 no longer writes a plain-folder store; MONAI's own bundle tracking uses the same
layout), TensorBoard event files in ``DIR/tensorboard/``.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from monai_fedpriv.tracking.tracker import RunTracker, logger

__all__ = [
    "TRACKERS", "FanOut", "MlflowBackend", "TensorBoardBackend", "check_tracking", "default_mlflow_uri", "open_tracker",
    "parse_trackers", "redact",
]  # fmt: skip

TRACKERS = ("mlflow", "tensorboard")
_INSTALL = "pip install 'monai-fedpriv[tracking]'"
_BAD_NAME = re.compile(r"[^A-Za-z0-9_\-. /:]")


def check_tracking(kind: str | None, flag: str = "--tracking") -> None:
    """Refuse a tracker that is unknown or whose package is missing, before anything trains."""
    from monai_fedpriv.cli.options import OptionError

    if kind is None:
        return
    if kind not in TRACKERS:
        raise OptionError(f"{flag} {kind!r}: choose mlflow, tensorboard or mlflow,tensorboard.")
    module = "mlflow" if kind == "mlflow" else "tensorboard"
    try:
        __import__(module)
    except ImportError:
        raise OptionError(f"{flag} {kind} needs the {module} package, which is not installed: {_INSTALL}.") from None


def default_mlflow_uri(folder: Path) -> str:
    """``sqlite:///DIR/mlruns.db`` of a run folder."""
    return "sqlite:///" + str((Path(folder) / "mlruns.db").resolve())


class MlflowBackend:
    """One MLflow run (a resumed run reopens its own)."""

    name = "mlflow"

    def __init__(self, uri: str, experiment: str, run_name: str, artifact_root: Path | None,
                 run_id: str | None = None) -> None:  # fmt: skip
        from mlflow.tracking import MlflowClient

        if uri.startswith(("http://", "https://")):  # a server that is down must not hold every round for minutes
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.uri = uri
        self.experiment = experiment
        self.client = MlflowClient(tracking_uri=uri)
        self.reopened = run_id is not None and self._reopen(run_id)
        if self.reopened:
            assert run_id is not None
            self.run_id = run_id
            return
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            location = artifact_root.resolve().as_uri() if artifact_root is not None else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=location)
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags={"monai_fedpriv": "1"}).info.run_id

    def _reopen(self, run_id: str) -> bool:
        try:
            self.client.update_run(run_id, status="RUNNING")
        except Exception:  # noqa: BLE001 - the store lost the run: start a new one
            return False
        return True

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "tracking_uri": redact(self.uri), "experiment": self.experiment,
                "run_id": self.run_id}  # fmt: skip

    def params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        held = self.client.get_run(self.run_id).data.params  # MLflow keeps a parameter's first value
        named = _unique({k: str(v)[:6000] for k, v in params.items()}, 250)
        new = [Param(k, v) for k, v in named.items() if k not in held]
        changed = [RunTag(f"changed.{k}"[:250], v[:5000]) for k, v in named.items() if k in held and held[k] != v]
        for start in range(0, len(new), 100):
            self.client.log_batch(self.run_id, params=new[start : start + 100])
        if changed:  # e.g. --rounds grown on --resume
            self.client.log_batch(self.run_id, tags=changed)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(values[tag]), now, int(step)) for tag, k in _unique({t: t for t in values}, 250,
                                                                                      keys_only=True).items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])

    def texts(self, step: int, texts: Mapping[str, str]) -> None:
        for tag, text in texts.items():  # one file per text: one that arrives later never replaces another
            self.client.log_text(self.run_id, f"{tag}: {text}\n", f"events/round-{int(step):04d}/{_file(tag)}.txt")

    def artifacts(self, paths: Iterable[tuple[Path, str]]) -> None:
        for path, where in paths:
            self.client.log_artifact(self.run_id, str(path), artifact_path=where or None)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


class TensorBoardBackend:
    """Event files in one folder (``tensorboard --logdir`` on it or a parent)."""

    name = "tensorboard"

    def __init__(self, logdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "logdir": str(self.logdir)}

    def params(self, params: Mapping[str, str]) -> None:
        rows = "".join(f"| {k} | {str(v).replace('|', '/')} |\n" for k, v in sorted(params.items()))
        self.writer.add_text("settings", "| setting | value |\n|---|---|\n" + rows, 0)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, int(step))
        self.writer.flush()

    def texts(self, step: int, texts: Mapping[str, str]) -> None:
        for tag, text in texts.items():
            self.writer.add_text(tag, text, int(step))

    def artifacts(self, paths: Iterable[tuple[Path, str]]) -> None:
        import matplotlib.image as mpimg

        listed = []
        for path, where in paths:
            if path.suffix == ".png":
                image = mpimg.imread(str(path))[..., :3]
                self.writer.add_image(f"{where or 'figures'}/{path.stem}", image, 0, dataformats="HWC")
            elif path.suffix in (".md", ".txt"):
                self.writer.add_text(f"{where or 'files'}/{path.name}", path.read_text(), 0)
            listed.append(f"- `{path}`")
        if listed:  # event files hold no files: say where they are
            self.writer.add_text("files", "\n".join(listed), 0)

    def close(self, status: str) -> None:
        self.writer.add_text("status", status, 0)
        self.writer.close()


def _artifact_root(uri: str) -> Path | None:
    """A local SQLite store keeps a new experiment's artifacts beside it (``mlruns/``, as MONAI's bundle tracking
    does); a server decides for itself."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).parent / "mlruns"
    return None


def _name(tag: str) -> str:
    """A name MLflow accepts: its characters only, no empty, ``.`` or ``..`` path segments."""
    parts = [p for p in _BAD_NAME.sub("_", str(tag)).split("/") if p.strip(" ") not in ("", ".", "..")]
    return "/".join(parts) or "_"


def _unique(named: Mapping[str, str], limit: int, keys_only: bool = False) -> dict[str, str]:
    """``{mlflow name: value}`` (``keys_only``: ``{original: mlflow name}``), names cut to ``limit`` and made
    unique with a ``~n`` suffix where cleaning or cutting made two equal."""
    out: dict[str, str] = {}
    seen: set[str] = set()
    for key, value in named.items():
        name, n = _name(key)[:limit], 1
        while name in seen:
            suffix = f"~{n}"
            name, n = _name(key)[: limit - len(suffix)] + suffix, n + 1
        seen.add(name)
        if keys_only:
            out[key] = name
        else:
            out[name] = value
    return out


def _file(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tag)[:120]


def redact(uri: str) -> str:
    """``uri`` without a user, password or query (what is printed and kept in ``tracking.json``)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not parts.netloc or "@" not in parts.netloc and not parts.query:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, f"***@{host}" if "@" in parts.netloc else host, parts.path, "", ""))


class FanOut:
    """Several backends fed the same values (``--tracking mlflow,tensorboard``)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.broken: set[str] = set()

    def describe(self) -> dict[str, Any]:
        facts: dict[str, Any] = {}
        for part in self.parts:
            facts.update(part.describe())
        return {**facts, "backend": self.name}

    def _each(self, method: str, *args: Any) -> None:
        """Call every working part; one that fails is warned about once and left out from then on, so the others
        keep logging."""
        for part in self.parts:
            if part.name in self.broken:
                continue
            try:
                getattr(part, method)(*args)
            except Exception as exc:  # noqa: BLE001
                self.broken.add(part.name)
                logger.warning(f"{part.name}: stopped logging this run: {type(exc).__name__}: {exc}"[:400])

    def params(self, params: Mapping[str, str]) -> None:
        self._each("params", params)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        self._each("scalars", step, values)

    def texts(self, step: int, texts: Mapping[str, str]) -> None:
        self._each("texts", step, texts)

    def artifacts(self, paths: Iterable[tuple[Path, str]]) -> None:
        self._each("artifacts", list(paths))

    def close(self, status: str) -> None:
        self._each("close", status)


def parse_trackers(text: str | None, flag: str = "--tracking") -> tuple[str, ...]:
    """``"mlflow,tensorboard"`` -> ``("mlflow", "tensorboard")``, each checked (:func:`check_tracking`)."""
    if text is None:
        return ()
    kinds = tuple(sorted(set(k.strip() for k in str(text).split(",") if k.strip())))  # one name whatever the order
    if not kinds:
        check_tracking("", flag)
    for kind in kinds:
        check_tracking(kind, flag)
    return kinds


def open_tracker(kind: str, folder: Path, name: str, *, uri: str | None = None, experiment: str | None = None,
                 resume: bool = False, logdir: Path | None = None) -> RunTracker:  # fmt: skip
    """The tracker of the run in ``folder``.

    Args:
        kind: ``"mlflow"``, ``"tensorboard"`` or both, comma-separated.
        name: the run's name (MLflow) when a new run starts.
        uri: MLflow tracking URI (default ``$MLFLOW_TRACKING_URI``, else ``sqlite:///DIR/mlruns.db``).
        experiment: MLflow experiment (default ``monai_fedpriv``).
        resume: continue what ``DIR/tracking.json`` says was logged (the same MLflow run).
        logdir: TensorBoard's event folder (default ``DIR/tensorboard``).
    """
    kinds = parse_trackers(kind)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = RunTracker.saved_state(folder, "+".join(kinds)) if resume else None
    parts: list[Any] = []
    for one in kinds:
        if one == "mlflow":
            target = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_mlflow_uri(folder)
            if state is not None and state.get("tracking_uri") != redact(target):
                state = None  # another store: a new run there, every round logged again
            backend = MlflowBackend(target, experiment or "monai_fedpriv", name, _artifact_root(target),
                                    run_id=(state or {}).get("run_id"))  # fmt: skip
            if not backend.reopened:
                state = None  # the store lost the run: the new one gets everything
            parts.append(backend)
        else:
            parts.append(TensorBoardBackend(logdir or folder / "tensorboard"))
    return RunTracker(parts[0] if len(parts) == 1 else FanOut(parts), folder, state)
