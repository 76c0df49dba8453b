"""One simulated site: its bundle parser, the bundle's own trainer with the federated handlers attached, its data
stream, random state and privacy objects, and how to save, restore and recover it."""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ignite.engine import Events
from monai.bundle import ConfigParser

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle, parser_get
from monai_fedpriv.data.stream import StreamSampler, derive_seed
from monai_fedpriv.errors import BundleError
from monai_fedpriv.handlers.federated_sync import FederatedSync
from monai_fedpriv.handlers.proximal import ProximalTerm
from monai_fedpriv.utils.rng import OwnedRandomState

__all__ = ["Budgeted", "SiteRuntime", "SiteSpec", "build_site"]

logger = logging.getLogger("monai_fedpriv.simulator")


@runtime_checkable
class Budgeted(Protocol):
    """What the simulator asks of a site's privacy budget (it never reaches into privacy internals)."""

    exhausted: bool
    policy: str

    def privacy_facts(self) -> dict[str, Any]: ...

    def bind_store(
        self, store: Any, site: str, run_id: str, cases: list[dict[str, Any]], fresh: bool, resumed: bool
    ) -> dict[str, Any]: ...

    def save_ledger(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class SiteSpec:
    """How the simulator builds every site: what it overrides in the bundle."""

    rounds: int
    epochs: int | None
    steps: int | None
    seed: int
    device: str
    momentum: str
    output_dir: Path
    num_workers: int = 0
    secure_noise: bool = False
    overrides: Mapping[str, Any] | None = None


class SiteRuntime:
    """One simulated site.

    The site's global random state (dropout and any other draw from PyTorch's, NumPy's or Python's global generator)
    is its own (:class:`~monai_fedpriv.utils.rng.OwnedRandomState`), active only while its trainer runs and saved
    with it, so every draw that shapes training is restored on resume.
    """

    def __init__(
        self,
        name: str,
        parser: ConfigParser,
        trainer: Any,
        sync: FederatedSync,
        sampler: StreamSampler | None,
        batch_size: int,
        stateful: Mapping[str, Any],
        rng: OwnedRandomState,
    ) -> None:
        self.name = name
        self.parser = parser
        self.trainer = trainer
        self.sync = sync
        self.sampler = sampler
        self.batch_size = batch_size
        self.stateful = dict(stateful)
        self.rng = rng
        self.losses: list[float] = []
        self.active = True
        self.setup: dict[str, Any] = {}

    # -- privacy, asked through the Budgeted protocol -----------------------------------------------------------
    @property
    def budgets(self) -> list[Budgeted]:
        return [o for o in self.stateful.values() if isinstance(o, Budgeted)]

    @property
    def privacy_budget(self) -> Any:
        """The site's one :class:`~monai_fedpriv.privacy.budget.PrivacyBudget` (``None`` without ``budget.json``)."""
        return next((b.budget for b in self.budgets if hasattr(b, "budget")), None)

    def exhausted_budgets(self) -> list[Budgeted]:
        return [b for b in self.budgets if b.exhausted]

    def privacy_facts(self) -> dict[str, Any] | None:
        facts = [b.privacy_facts() for b in self.budgets]
        return max(facts, key=lambda f: f.get("epsilon") or 0.0) if facts else None

    def bind_ledger_store(
        self, store: Any, run_id: str, cases: list[dict[str, Any]], fresh: bool = False, resumed: bool = False
    ) -> dict[str, Any] | None:
        """Bind the site's budget to a :class:`~monai_fedpriv.privacy.ledger_store.LedgerStore`: it carries what
        earlier runs spent on ``cases`` and records every release; returns the store's facts for ``metrics.json``
        (``None`` for a site without a budget)."""
        facts = None
        for budget in self.budgets:
            facts = budget.bind_store(store, self.name, run_id, cases, fresh=fresh, resumed=resumed)
        return facts

    def save_ledgers(self) -> None:
        """Record the site's ledger in its store now (the end of a run)."""
        for budget in self.budgets:
            budget.save_ledger()

    # -- running ------------------------------------------------------------------------------------------------
    @property
    def network(self) -> Any:
        """The plain network the site trains (under any privacy wrapper)."""
        from monai_fedpriv.fl.weights import unwrap

        return unwrap(self.sync.network if self.sync.network is not None else self.trainer.network)

    @property
    def dp_sgd(self) -> bool:
        """Whether the site trains with DP-SGD (``dp.json``): its rounds may hold noise-only steps of empty draws."""
        return parser_get(self.parser, "dp") is not None

    def round_in_training(self) -> int:
        """The round the site is training (1-based): one more than the rounds it has completed."""
        return self.sync.round + 1

    def run_round(self) -> None:
        """Resume the trainer until the sync handler has sent this round's update (or the run ends)."""
        self.losses = []
        with self.rng.active():
            self.trainer.run()

    # -- state --------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "engine": self.trainer.state_dict(),
            "optimizer": self.trainer.optimizer.state_dict(),
            "sync": self.sync.state_dict(),
            "sampler": self.sampler.state_dict() if self.sampler is not None else None,
            "stateful": {k: v.state_dict() for k, v in self.stateful.items()},
            "rng": self.rng.state_dict(),
            "active": self.active,
        }

    def load_state_dict(self, state: Mapping[str, Any], max_epochs: int) -> None:
        for key in ("engine", "optimizer", "sync", "sampler", "stateful", "rng", "active"):
            if key not in state:
                raise KeyError(f"checkpoint of {self.name} lacks required key {key!r}.")
        engine_state = dict(state["engine"])
        engine_state["max_epochs"] = max_epochs
        self.trainer.load_state_dict(engine_state)
        self.trainer._internal_run_generator = None  # Ignite's suspended run (interrupt/resume) starts afresh
        self.trainer.optimizer.load_state_dict(state["optimizer"])
        self.sync.load_state_dict(state["sync"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
            # consumed samples, not the prefetch position: every batch of a stream is full
            self.sampler.position = self.trainer.state.iteration * self.batch_size
        for key, obj in self.stateful.items():
            if key not in state["stateful"]:
                raise KeyError(f"checkpoint of {self.name} lacks state of {key!r}.")
            obj.load_state_dict(state["stateful"][key])
        self.rng.load_state_dict(state["rng"])
        self.active = bool(state["active"])

    def snapshot(self) -> dict[str, Any]:
        """An in-memory copy of the site's state (to recover from a failed round)."""
        return copy.deepcopy(self.state_dict())

    def rollback(self, snapshot: Mapping[str, Any], max_epochs: int) -> None:
        """Return to ``snapshot`` after the site's training raised, keeping every privacy ledger as it is now.

        A ledger is never rolled back: whatever the failed attempt spent stays spent (over-counting is safe,
        under-counting is not).
        """
        keep = {k: o.state_dict() for k, o in self.stateful.items() if isinstance(o, Budgeted)}
        self.release_engine()
        self.load_state_dict(snapshot, max_epochs)
        for key, state in keep.items():
            self.stateful[key].load_state_dict(state)

    def release_engine(self) -> None:
        """Close an engine left interrupted mid-run so Ignite does not report its suspended run as a failure."""
        paused = getattr(self.trainer, "_internal_run_generator", None)  # Ignite's interrupt/resume state
        if paused is None:
            return
        level = self.trainer.logger.level
        self.trainer.logger.setLevel(logging.CRITICAL)
        try:
            paused.close()
        except Exception:  # noqa: BLE001 - a generator that already raised: nothing left to close
            pass
        finally:
            self.trainer.logger.setLevel(level)
            self.trainer._internal_run_generator = None


def build_site(
    bundle: BundleSpec,
    name: str,
    data: list[dict[str, Any]],
    spec: SiteSpec,
    transport: Any,
    extra_filters: Callable[[str], list[Any]] | None = None,
) -> SiteRuntime:
    """Build one site from the bundle: its parser (data list, stream loader, seeds, local work, transport),
    the bundle's trainer, the sync handler (the bundle's ``fed_sync`` or one built here) and the privacy and audit
    handlers of the override files."""
    common = {"device": f"$torch.device('{spec.device}')", "seed": spec.seed, **(spec.overrides or {})}
    probe = load_bundle(bundle, common)
    batch_size = int(probe.get_parsed_content("train#dataloader#batch_size"))
    site_seed = derive_seed(spec.seed, "site", name)
    n_batches = -(-len(data) // batch_size)
    if spec.epochs is not None:
        max_epochs, epoch_length, every = spec.rounds * spec.epochs, n_batches, spec.epochs
    else:
        max_epochs, epoch_length, every = spec.rounds, int(spec.steps or 1), 1
    overrides = {
        **common,
        "site": name,
        "train#dataset#data": data,
        "train#dataloader": {
            "_target_": "monai_fedpriv.data.stream.make_stream_loader",
            "dataset": "@train#dataset",
            "batch_size": batch_size,
            "seed": site_seed,
            "num_workers": spec.num_workers,
        },
        "site_seed": site_seed,
        # simulation: noise seeded from the config (reproducible), unless --noise secure asks for OS entropy
        "privacy_noise_seed": None if spec.secure_noise else derive_seed(spec.seed, "privacy-noise", name),
        "privacy_log_epochs": False,  # the simulator prints one line per round, epsilon included
        # anything the bundle writes (checkpoints, evaluation, attack audits) goes into the run, not the bundle
        "ckpt_dir": str(spec.output_dir / "sites" / name / "models"),
        "output_dir": str(spec.output_dir / "sites" / name),
        "train#trainer#max_epochs": max_epochs,
        "train#trainer#epoch_length": epoch_length,
        "train#trainer#train_handlers": [],
        # read by fed.json, when the bundle uses it
        "fed_transport": transport,
        "fed_site": name,
        "fed_every": every,
        "fed_unit": "epochs",
        "fed_momentum": spec.momentum,
    }
    parser = load_bundle(bundle, overrides)
    trainer = parser.get_parsed_content("train#trainer")
    trainer.logger.setLevel(logging.CRITICAL)  # a site's failure is reported by the simulator, once, with its reason
    sampler = getattr(trainer.data_loader, "sampler", None)
    if not isinstance(sampler, StreamSampler):
        # an override (e.g. dp.json's Poisson loader) replaced the stream; its own state is in fed_stateful
        sampler = None
    extra = list(extra_filters(name)) if extra_filters else []
    stateful = dict(parser.get_parsed_content("fed_stateful")) if parser_get(parser, "fed_stateful") else {}
    if parser_get(parser, "fed_sync") is not None:  # the bundle's fed.json wires the handler: use it
        sync = parser.get_parsed_content("fed_sync")
        if not isinstance(sync, FederatedSync):
            raise BundleError(f"bundle id 'fed_sync' should build a FederatedSync, got {type(sync).__name__}.")
        sync.add_filters(extra)
        sync.n_samples, sync.batch_size = len(data), batch_size
    else:
        filters = list(parser.get_parsed_content("fed_filters")) if parser_get(parser, "fed_filters") else []
        sync = FederatedSync(
            transport, site=name, every=every, unit="epochs", momentum=spec.momentum, filters=filters + extra,
            n_samples=len(data), batch_size=batch_size,
        )  # fmt: skip
    sync.attach(trainer)
    ProximalTerm().attach(trainer)  # FedProx: acts only when a round's instruction has prox_mu > 0
    # budget, privacy and audit handlers of the override files (attaching the sync handler twice is a no-op)
    for handler in parser.get_parsed_content("fed_handlers") if parser_get(parser, "fed_handlers") else []:
        handler.attach(trainer)
    rng = OwnedRandomState(derive_seed(spec.seed, "global-rng", name))
    site = SiteRuntime(name, parser, trainer, sync, sampler, batch_size, stateful, rng)
    dp: Any = parser.get_parsed_content("dp") if parser_get(parser, "dp") is not None else None
    site.setup = dp.setup_facts() if hasattr(dp, "setup_facts") else {}  # what DP-SGD changed in the network

    def record_loss(engine: Any) -> None:
        out = engine.state.output
        if isinstance(out, list):  # MONAI returns a list of dicts for list-collated batches
            out = out[0]
        loss = out.get("loss") if isinstance(out, dict) else None
        if loss is not None:
            site.losses.append(float(loss))

    trainer.add_event_handler(Events.ITERATION_COMPLETED, record_loss)
    return site
