"""The in-process simulator as a :class:`~monai_fedpriv.fl.workflow.ServerChannel`: a broadcast publishes the global
model (and each site's instruction) on the in-process transport, and the asked sites train one after another
(:func:`~monai_fedpriv.fl.simulator.site_round.train_round`: roll-back of a failed site, budget stops, timeouts);
their updates come back through the codec, measured in bytes."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import decode, encode, encode_global
from monai_fedpriv.fl.instruction import RoundInstruction
from monai_fedpriv.fl.messages import GeneratorState
from monai_fedpriv.fl.replay.upload import upload_message
from monai_fedpriv.fl.server.work import WorkBound, instructed_bound
from monai_fedpriv.fl.simulator.ledgers import SiteLedgers
from monai_fedpriv.fl.simulator.run_config import LocalWork
from monai_fedpriv.fl.simulator.server_model import ServerModel
from monai_fedpriv.fl.simulator.site import SiteRuntime
from monai_fedpriv.fl.simulator.site_round import train_round
from monai_fedpriv.fl.tensor_codec import ShapeExpect
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.update import GlobalModel
from monai_fedpriv.fl.workflow.channel import Gathered, RoundRequest, ServerChannel
from monai_fedpriv.privacy.noise import NOISE_SECURE, NOISE_SEEDED

__all__ = ["InProcessChannel"]


class InProcessChannel(ServerChannel):
    """In-process sites behind one :class:`~monai_fedpriv.fl.transport.InProcessTransport`."""

    def __init__(
        self, sites: dict[str, SiteRuntime], transport: InProcessTransport, server_model: ServerModel,
        local_work: LocalWork, max_epochs: int, ledgers: SiteLedgers, secure_noise: bool,
        round_timeout: float | None = None, latents_unprotected: bool = False, split: Any = None,
        keeper: Any = None, secure: Any = None,
    ) -> None:  # fmt: skip
        self.runtimes = sites
        self.sites = list(sites)
        self.transport = transport
        self.server_model = server_model
        self.local_work = local_work
        self.max_epochs = max_epochs
        self.ledgers = ledgers
        self.secure_noise = secure_noise
        self.round_timeout = round_timeout
        self.latents_unprotected = bool(latents_unprotected)
        self.split = split  # SplitNN's server part (:class:`~monai_fedpriv.fl.split.SplitServer`), or None
        self.keeper = keeper  # what the server keeps of uploads (CWT+Replay's generator relay), or None
        self.secure = secure  # secure aggregation's gather (:class:`~monai_fedpriv.fl.secure.SecureGather`), or None
        self.snapshots: dict[str, Any] = {}
        self.snapshot()

    def snapshot(self) -> None:
        """Keep every site's state now: a site whose next round fails returns to it."""
        self.snapshots = {name: site.snapshot() for name, site in self.runtimes.items()}

    def gather(self, request: RoundRequest) -> Gathered:
        self.transport.publish(request.model)
        self.transport.wire_bytes = {}
        broadcast = len(encode_global(request.model))  # what a remote site would receive
        got = Gathered()
        for name in request.targets:
            site = self.runtimes[name]
            phase = request.model.instruction_for(name).phase
            received = broadcast
            if phase in ("upload", "generator"):
                got.received_bytes[name] = received + self._upload(site, request, got, phase)
                continue
            if self._generator() is not None:  # CWT+Replay: this round's replayed pairs, from the generator sent
                try:
                    received += self._refresh_replay(site, request.round)
                except Exception as exc:  # noqa: BLE001 - a generator the site cannot decode fails its round
                    got.failures[name], got.sites[name] = f"replay failed: {type(exc).__name__}: {exc}", {}
                    got.expected.append(name)
                    continue
            split = self.split is not None and phase == "split"
            if split:  # the site gets its own part only: the server part never leaves the server
                own = self.split.site_model(request.model)
                self.transport.publish(own)
                received = len(encode_global(self.split.site_model(request.model, drop=True)))
                self.split.begin(name, request.round, request.model.weights)
                link = self._link(site)
                link.reset(request.round)
            result, answers, failure = train_round(
                site, request.round, self.transport, self.snapshots[name], self.max_epochs,
                self.server_model.evaluators.get(name), timeout=self.round_timeout,
            )  # fmt: skip
            if split:
                self.split.end(failed=bool(failure))
                if not failure:
                    got.server_weights.update(self.split.weights())
                result.update(batch_messages=link.messages, batch_bytes_sent=link.bytes_sent,
                              batch_bytes_received=link.bytes_received)  # fmt: skip
            if site.exhausted_budgets():
                result.setdefault("privacy", site.privacy_facts())
            got.sites[name], got.received_bytes[name] = result, received
            if answers:
                got.expected.append(name)
            if failure:
                got.failures[name] = failure
            if not site.active:
                got.left.append(name)
        if self.secure is not None:  # the sites hold their updates; the server gets their sum only
            self._secure_sum(request, got)
        got.updates = self.transport.collect()
        got.failures.update(self.transport.take_rejected())  # bytes that did not decode: that site's rejection
        got.wire_bytes.update(self.transport.wire_bytes)  # updates' bytes, next to any upload's
        self.snapshot()
        return got

    def _secure_sum(self, request: RoundRequest, got: Gathered) -> None:
        held = self.transport.take_held()  # type: ignore[attr-defined]
        outcome = self.secure.run(request.round, list(request.targets), held, request.model.weights)
        got.secure = outcome
        got.wire_bytes.update(outcome.bytes_sent)
        for name in held:
            got.received_bytes[name] = got.received_bytes.get(name, 0) + outcome.bytes_received.get(name, 0)
            facts = self.runtimes[name].privacy_facts()
            if facts is not None:  # the distributed-DP release is in the site's ledger now
                got.sites.setdefault(name, {})["privacy"] = facts

    @staticmethod
    def _link(site: SiteRuntime) -> Any:
        from monai_fedpriv.fl.split.link import RemoteSkip
        from monai_fedpriv.fl.weights import unwrap

        return next(m.link for m in unwrap(site.trainer.network).modules() if isinstance(m, RemoteSkip))

    def _generator(self) -> Any:
        """The generator CWT+Replay's server holds now (``None`` for other strategies or before the first visit)."""
        return getattr(self.keeper, "current", None)

    def _handed(self) -> tuple[Any, int]:
        """The generator as the site receives it: through the codec, decoded as untrusted (and its bytes)."""
        current = self._generator()
        if current is None:
            return None, 0
        data = encode(GeneratorState("server", max(1, current.round), current.weights, current.codes))
        return decode(data, ShapeExpect(GeneratorState.kind, "server", None, {
            **{f"weights.{k}": tuple(v.shape) for k, v in current.weights.items()},
            "codes.codes": (None, *current.codes.shape[1:])})), len(data)  # fmt: skip

    def _refresh_replay(self, site: SiteRuntime, rnd: int) -> int:
        from monai_fedpriv.generative.site import ReplayMix, fill_replay

        state, size = self._handed()
        mix = site.trainer.data_loader.dataset.base
        if isinstance(mix, ReplayMix):
            with site.rng.active():
                fill_replay(site, mix, state, rnd, self.keeper.seed)
        return size

    def _upload(self, site: SiteRuntime, request: RoundRequest, got: Gathered, phase: str) -> int:
        """One site's upload (FedReplay's latents, or CWT+Replay's generator visit), through its filters and the
        codec (what the server decodes is what crossed the wire); a site whose upload fails is that round's failure,
        with its reason. Returns the bytes the site received beyond the global model (the generator handed)."""
        name = site.name
        got.expected.append(name)
        handed = 0
        try:
            state, handed = self._handed() if phase == "generator" else (None, 0)
            seed = getattr(self.keeper, "seed", 0)
            upload = upload_message(site, request.model, request.round, seed, self.latents_unprotected, state)
            data = encode(upload)
        except Exception as exc:  # noqa: BLE001 - a site's failure is that site's
            got.failures[name] = f"upload failed: {type(exc).__name__}: {exc}"
            got.sites[name] = {"privacy": site.privacy_facts()} if site.budgets else {}
            return handed
        try:
            shapes = {f"{field}.{key}": (None,) * t.dim() for field, ts in upload.fields().items()
                      for key, t in ts.items()}  # fmt: skip
            got.uploads.append(decode(data, ShapeExpect(upload.kind, name, request.round, shapes)))
        except UpdateError as exc:
            got.failures[name] = f"undecodable upload: {exc}"
        got.wire_bytes[name] = len(data)
        got.sites[name] = {"privacy": site.privacy_facts()} if site.budgets else {}
        return handed

    def work_bounds(
        self, instructions: Mapping[str, RoundInstruction], declared: Mapping[str, int]
    ) -> dict[str, WorkBound]:
        """The steps the server asks of each site (its instruction, else the run's local work) and the size of the
        training data it was built with."""
        bounds = {}
        for name, instruction in instructions.items():
            site = self.runtimes[name]
            bounds[name] = instructed_bound(int(site.sync.n_samples or 0), site.batch_size, self.local_work.epochs,
                                            self.local_work.steps, site.dp_sgd, instruction)  # fmt: skip
        return bounds

    def score(self, weights: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        scores = self.server_model.evaluate(weights)
        return {"dice": scores["dice"], "per_site": scores["per_set"], "dice_per_class": scores["per_class"]}

    def publish(self, model: GlobalModel) -> None:
        self.transport.publish(model)

    def close(self) -> None:
        for site in self.runtimes.values():
            site.release_engine()
        self.ledgers.save(self.runtimes)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if (metric := self.server_model.metric()) is not None:
            out["metric"] = metric
        setup = {name: site.setup for name, site in self.runtimes.items() if site.setup}
        if setup:
            out["setup"] = setup
        if any(site.budgets or site.setup for site in self.runtimes.values()):
            out["noise_source"] = NOISE_SECURE if self.secure_noise else NOISE_SEEDED
        if self.ledgers.summary() is not None:
            out["ledger_store"] = self.ledgers.summary()
        if self.latents_unprotected:
            out["latents_unprotected"] = "the sites were allowed to send features, latents or codes unprotected"
        if self.secure is not None:
            out["secure_aggregation"] = self.secure.settings.describe()
        return out

    def state_dict(self) -> dict[str, Any]:
        out = {"sites": self.snapshots, "run_id": self.ledgers.run_id}
        if self.split is not None:
            out["split"] = self.split.state_dict()
        return out

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, site in self.runtimes.items():
            site.load_state_dict(state["sites"][name], self.max_epochs)
        self.snapshot()
        self.ledgers.run_id = str(state.get("run_id") or self.ledgers.run_id)
        if self.split is not None:
            self.split.load_state_dict(state.get("split") or {})
