"""NVIDIA FLARE's server side as a :class:`~monai_fedpriv.fl.workflow.ServerChannel`: a round is one
``broadcast_model`` of the codec bytes of the global model (each site's instruction inside) with ``min_responses``,
a timeout and ``wait_time_after_min_received`` (FLARE counts an error reply as an answer; waiting on lets slower
good results in); every answer is site-controlled, so whatever is wrong with one is that site's rejection, never the
end of the round. Sites score each global model on their own validation cases and report it with their next
answer (and in a final ``validate`` task): the server never sees data."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import Expected, decode, decode_update, encode, encode_global
from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.messages import GeneratorState, LatentUpload
from monai_fedpriv.fl.nvflare.answers import MalformedAnswer, Rejected, client_name, privacy_problem, read_answer
from monai_fedpriv.fl.nvflare.settings import JobSettings
from monai_fedpriv.fl.server.work import WorkBound, bundle_work, work_bounds
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.wire import MOMENTS
from monai_fedpriv.fl.workflow.channel import Gathered, RoundRequest, ServerChannel
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED

__all__ = ["FlareChannel"]


class FlareChannel(ServerChannel):
    """The rounds of a ``ModelController`` (``controller``: its ``broadcast_model``, abort signal and failed clients).

    Args:
        controller: the running :class:`~monai_fedpriv.fl.nvflare.controller.FedPrivController`.
        settings: the job's settings.
        bundle: the job's bundle (its batch size and DP setting bound the sites' work claims).
        required: ``n targets -> acceptable answers needed`` (the server round's ``--min-sites``).
        keeper: what the server keeps of the sites' uploads (CWT+Replay's generator travels with every task).
    """

    def __init__(self, controller: Any, settings: JobSettings, bundle: BundleSpec,
                 required: Callable[[int], int], keeper: Any = None) -> None:  # fmt: skip
        self.controller, self.settings, self.required, self.keeper = controller, settings, required, keeper
        self.sites = list(settings.sites)
        self.batch_size, self.dp_sgd = bundle_work(bundle, settings.seed)
        self.reported: dict[str, Any] = {"setup": {}, "metric": None, "privacy": False}
        self.secure: Any = None
        if settings.secure_aggregation is not None:
            from monai_fedpriv.fl.secure import SecureAggregation

            self.secure = SecureAggregation(**settings.secure_aggregation)

    def gather(self, request: RoundRequest) -> Gathered:
        blob = encode_global(request.model)
        extras = self._extras()
        if self.secure is not None:  # the sites keep their updates; the server gets their sum only
            from monai_fedpriv.fl.nvflare.secure_stages import secure_gather

            return secure_gather(self, request, blob, extras)
        results = self._broadcast("train", blob, request.targets, request.round, request.last_trained, extras)
        size = len(blob) + sum(len(v) for v in extras.values())
        got = Gathered(received_bytes={name: size for name in request.targets})
        moments = MOMENTS if self.settings.momentum == "aggregate" else 0
        rank = {name: k for k, name in enumerate(self.sites)}
        for res in sorted(results, key=lambda r: rank.get(client_name(r), len(rank))):
            name = client_name(res)
            if name not in request.targets or name in got.sites:
                self.controller.warning(f"round {request.round}: ignored an answer from {name!r}, which was not asked "
                                        f"or already answered")  # fmt: skip
                continue
            try:
                self._read(request, name, res, moments, got)
            except Exception as exc:  # noqa: BLE001 - a malformed answer is this site's rejection
                got.failures[name] = str(exc) if isinstance(exc, Rejected) else f"malformed answer: {exc!r}"[:500]
                got.sites[name] = {}
                got.updates = [u for u in got.updates if u.site != name]
                got.wire_bytes.pop(name, None)
                got.expected += [] if name in got.expected else [name]
        errored = set(getattr(self.controller, "_current_failed_clients", set()) or set())
        for name in request.targets:
            if name not in got.sites:
                got.failures[name] = ("no answer: the site's trainer failed (NVFlare error reply)" if name in errored
                                      else f"no answer within the round's timeout ({self.settings.round_timeout} s)")
                got.expected.append(name)
        return got

    def _extras(self) -> dict[str, bytes]:
        """Messages every task carries besides the global model: CWT+Replay's generator, once a site trained it."""
        current = getattr(self.keeper, "current", None)
        if current is None:
            return {}
        return {"generator": encode(GeneratorState("server", max(1, current.round), current.weights, current.codes))}

    def _broadcast_stage(self, task: str, params: Mapping[str, bytes], targets: list[str], rnd: int,
                         need: int) -> list:  # fmt: skip
        """One stage of secure aggregation: ``params`` (encoded stage messages) to ``targets``."""
        data = FLModel(params_type=ParamsType.FULL, params=dict(params), current_round=rnd - 1,
                       total_rounds=self.settings.rounds, meta={"round": rnd, "secagg_stage": task})  # fmt: skip
        return self.controller.broadcast_model(data=data, task_name=task, targets=targets,
                                               min_responses=min(need, len(targets)),
                                               timeout=int(self.settings.round_timeout),
                                               wait_time_after_min_received=int(self.settings.wait_after_min)) or []

    def _broadcast(self, task: str, blob: bytes, targets: list[str], rnd: int, last: dict | None = None,
                   extras: Mapping[str, bytes] | None = None, secagg: dict | None = None) -> list:  # fmt: skip
        meta = {"round": rnd, "validate": task == "validate", "last_trained": dict(last or {})}
        if secagg is not None:
            meta["secagg"] = secagg
        params = {"global": blob, **dict(extras or {})}
        data = FLModel(params_type=ParamsType.FULL, params=params, current_round=rnd - 1,
                       total_rounds=self.settings.rounds, meta=meta)
        need = None if task == "validate" else min(self.required(len(targets)), len(targets))
        timeout = int(self.settings.round_timeout) or (600 if task == "validate" else 0)
        return self.controller.broadcast_model(data=data, task_name=task, targets=targets, min_responses=need,
                                               timeout=timeout,
                                               wait_time_after_min_received=int(self.settings.wait_after_min)) or []

    def _read(self, request: RoundRequest, name: str, res: Any, moments: int, got: Gathered) -> None:
        """Take one site's answer into ``got`` (raises for a malformed one; nothing is kept before it is checked)."""
        answer = read_answer(dict(res.meta or {}))
        blob = (res.params or {}).get("update")
        update = None
        phase = request.model.instruction_for(name).phase
        if phase in ("upload", "generator"):
            self._read_upload(request, name, phase, blob, answer, got)
            return
        if not answer.failed and isinstance(blob, (bytes, bytearray)):
            # untrusted bytes, decoded against the model, the site asked and the round: nothing larger is allocated
            expect = Expected.of(request.model.weights, site=name, round=request.round, moments=moments)
            try:
                update = decode_update(bytes(blob), expect)
            except Exception as exc:  # noqa: BLE001
                raise Rejected(f"undecodable update: {exc if isinstance(exc, UpdateError) else repr(exc)}") from None
            if "privacy" in update.meta and (problem := privacy_problem(update.meta["privacy"])):
                raise MalformedAnswer(f"update {problem}")
        got.sites[name] = answer.result
        self._note(name, answer.setup, answer.scored, answer.result)
        if answer.scored:
            got.scored[name] = answer.scored
        if answer.failed:
            got.failures[name] = answer.failed
            got.expected.append(name)
        elif update is not None:
            got.expected.append(name)
            got.wire_bytes[name] = len(blob) if isinstance(blob, (bytes, bytearray)) else 0
            got.updates.append(update)
        if answer.result.get("stopped"):
            got.left.append(name)

    def _read_upload(self, request: RoundRequest, name: str, phase: str, blob: Any, answer: Any,
                     got: Gathered) -> None:  # fmt: skip
        """A site's dataset upload or generator visit: decoded as untrusted bytes of the kind asked (from the site
        asked, of the round in progress), screened by the loop."""
        got.sites[name] = answer.result
        got.expected.append(name)
        self._note(name, answer.setup, answer.scored, answer.result)
        if answer.scored:
            got.scored[name] = answer.scored
        if answer.failed or not isinstance(blob, (bytes, bytearray)):
            got.failures[name] = answer.failed or "sent no upload"
            return
        kind = LatentUpload.kind if phase == "upload" else GeneratorState.kind
        try:
            message = decode(bytes(blob))
            if message.kind != kind or message.site != name or message.round != request.round:
                raise UpdateError(f"it is a {message.kind} of {message.site!r} round {message.round}, expected a "
                                  f"{kind} of {name!r} round {request.round}")  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            raise Rejected(f"undecodable upload: {exc if isinstance(exc, UpdateError) else repr(exc)}") from None
        got.uploads.append(message)
        got.wire_bytes[name] = len(blob)

    def _note(self, name: str, setup: dict | None, scored: dict, result: dict) -> None:
        if setup:
            self.reported["setup"][name] = setup
        if scored.get("metric"):
            self.reported["metric"] = scored["metric"]
        self.reported["privacy"] = self.reported["privacy"] or bool(result.get("privacy"))

    def work_bounds(
        self, instructions: Mapping[str, RoundInstruction], declared: Mapping[str, int]
    ) -> dict[str, WorkBound]:
        return work_bounds(self.settings, self.batch_size, self.dp_sgd, declared, instructions)

    def aborted(self) -> bool:
        signal = self.controller.abort_signal
        return signal is not None and signal.triggered

    def finish(self, model: GlobalModel, last_trained: Mapping[str, int]) -> dict[str, dict[str, Any]]:
        """Every site scores the final global model on its own validation cases."""
        if model.round == 0:
            return {}
        scored = {}
        for res in self._broadcast("validate", encode_global(model), list(self.sites), model.round + 1,
                                   dict(last_trained)):
            try:
                answer = read_answer(dict(res.meta or {}))
            except Exception as exc:  # noqa: BLE001 - a malformed score is left out, never the end of the job
                self.controller.warning(f"validation: ignored the answer of {client_name(res)!r}: {exc}")
                continue
            if answer.scored:
                scored[client_name(res)] = answer.scored
        return scored

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job": {"name": self.settings.name, "fingerprint": self.settings.fingerprint()},
                               "partition": self.settings.partition}  # fmt: skip
        if self.reported["metric"]:
            out["metric"] = self.reported["metric"]
        if self.reported["setup"]:
            out["setup"] = self.reported["setup"]
        if self.reported["setup"] or self.reported["privacy"]:
            out["noise_source"] = NOISE_SECURE if self.settings.secure_noise else NOISE_SEEDED
        if self.settings.data_summary:
            out["data"] = self.settings.data_summary
        if self.settings.latents_unprotected:
            out["latents_unprotected"] = "the sites were allowed to send features, latents or codes unprotected"
        if self.secure is not None:
            out["secure_aggregation"] = self.secure.describe()
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"reported": self.reported}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reported = dict(state.get("reported") or self.reported)
