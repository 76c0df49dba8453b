"""In-process simulation of N federated sites built from one MONAI bundle: the construction of the sites and the
server's model, and the :class:`~monai_fedpriv.fl.workflow.RunLoop` over an
:class:`~monai_fedpriv.fl.simulator.channel.InProcessChannel` (the rounds, stop policy, checkpoints, resume and
``metrics.json`` are the loop's, the same as under NVIDIA FLARE).

Each site gets its own ``ConfigParser`` of the bundle with its data list and a reproducible stream loader, so its
``SupervisedTrainer`` is the bundle's own trainer with :class:`~monai_fedpriv.handlers.FederatedSync` attached
(:mod:`.site`). A site whose training raises is rolled back to its state at the start of the round (its privacy
ledger kept as spent) and rejected for that round; a round with too few acceptable updates ends the run with the
last completed round's checkpoint intact (:class:`~monai_fedpriv.errors.FederationError`), and ``run(resume=True)``
continues from it with identical results.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.bundle.loader import BundleSpec
from monai_fedpriv.data.share_pool import is_public, refuse_public
from monai_fedpriv.data.splits import check_patients_at_one_site
from monai_fedpriv.errors import DataError
from monai_fedpriv.fl.server.round import ServerRound
from monai_fedpriv.fl.server.screening import ScreenSettings
from monai_fedpriv.fl.simulator.channel import InProcessChannel
from monai_fedpriv.fl.simulator.faults import Fault, FaultInjector
from monai_fedpriv.fl.simulator.ledgers import SiteLedgers
from monai_fedpriv.fl.simulator.run_config import LocalWork, run_fingerprint
from monai_fedpriv.fl.simulator.server_model import ServerModel
from monai_fedpriv.fl.simulator.site import SiteSpec, build_site
from monai_fedpriv.fl.strategies import FedAvg, Strategy
from monai_fedpriv.fl.transport.inprocess import InProcessTransport
from monai_fedpriv.fl.workflow import RunLoop

__all__ = ["FederatedSimulator", "LocalWork"]


class FederatedSimulator:
    """Run federated training of a bundle over in-process sites.

    Args:
        bundle: the bundle and config files to train (``BundleSpec``).
        train_sites: ``{site name: training data list}``; order fixes the site order.
        eval_sets: ``{name: validation data list}``; a site's own Dice uses the set of the same name, the global
            model is scored on every set and on their union.
        rounds: number of federated rounds.
        local_work: local epochs or steps per round.
        output_dir: where ``metrics.json``, ``models/`` and ``checkpoints/`` go.
        strategy: server strategy (default :class:`~monai_fedpriv.fl.strategies.FedAvg` weighted by local steps).
        momentum: client optimiser policy, ``"restart"``, ``"local"`` or ``"aggregate"``.
        seed: run seed (model init, data streams, augmentation, and privacy noise unless ``secure_noise``).
        device: training device.
        overrides: extra bundle overrides applied to every parser.
        filters_factory: ``site name -> list of update filters``, appended to each site's chain.
        num_workers: data-loader workers per site.
        progress: print one line per round.
        label: name in progress lines.
        screen: how the server screens updates (:class:`~monai_fedpriv.fl.server.ScreenSettings`).
        min_sites: acceptable updates a round needs (default all but one of its sites, at least one).
        faults: faults to inject (:mod:`.faults`).
        secure_noise: draw every site's privacy noise from OS entropy instead of the run seed.
        on_round: called with the metrics dict after every completed round (e.g. to keep a report current).
        partition: the scheme that split the cases onto the sites (``--partition``), part of the fingerprint.
        round_timeout: seconds of wall time each site has to send its round's update (``None`` or 0: no limit); a
            site past it is rejected for the round as under NVIDIA FLARE (:func:`.site_round.train_round`).
        ledger_store: a :class:`~monai_fedpriv.privacy.ledger_store.LedgerStore`: each site's budget carries what
            earlier runs spent on its cases and records its releases there (``None``: this run's ledger only).
        fresh_budget: start every site's budget at zero even if the store holds earlier spending (stated in
            ``metrics.json``).
        latents_unprotected: the sites may send a dataset upload (FedReplay's latents) that no filter covers
            (``--latents-unprotected``; stated in ``metrics.json``).
        secure_aggregation: a :class:`~monai_fedpriv.fl.secure.SecureAggregation`: the server learns only the sum of
            each round's updates (and, with distributed DP, a noisy one); ``None``: it sees every update.

    Example::

        sim = FederatedSimulator(BundleSpec(Path("bundles/brain_tissue_2d")), train_sites, eval_sets,
                                 rounds=10, local_work=LocalWork(epochs=1), output_dir=Path("runs/x"))
        metrics = sim.run()
    """

    def __init__(
        self, bundle: BundleSpec, train_sites: Mapping[str, Sequence[dict[str, Any]]],
        eval_sets: Mapping[str, Sequence[dict[str, Any]]], rounds: int, local_work: LocalWork, output_dir: Path,
        strategy: Strategy | None = None, momentum: str = "restart", seed: int = 0, device: str | torch.device = "cpu",
        overrides: Mapping[str, Any] | None = None, filters_factory: Callable[[str], list[Any]] | None = None,
        num_workers: int = 0, progress: bool = True, label: str = "federated", screen: ScreenSettings | None = None,
        min_sites: int | None = None, faults: Sequence[Fault] = (), secure_noise: bool = False,
        on_round: Callable[[dict[str, Any]], None] | None = None, partition: str | None = None,
        round_timeout: float | None = None, ledger_store: Any = None, fresh_budget: bool = False,
        latents_unprotected: bool = False, secure_aggregation: Any = None,
    ) -> None:  # fmt: skip
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds should be an int >= 1, got {rounds!r}.")
        if not train_sites or any(not data for data in train_sites.values()):
            empty = [name for name, data in train_sites.items() if not data]
            raise DataError(f"site {empty[0]!r} has no training cases." if empty else "no training sites were given.")
        self.strategy = strategy or FedAvg()
        if (problem := self.strategy.work_problem(local_work.steps, min_sites)) is not None:
            raise ValueError(problem)
        refuse_public(train_sites)
        # FedAvg+Share: each site's private cases followed by the public pool
        self.train_sites = self.strategy.site_data({k: list(v) for k, v in train_sites.items()}, int(seed))
        if rounds < self.strategy.min_rounds:
            raise ValueError(f"--rounds {rounds}: --strategy {self.strategy.name} needs at least "
                             f"{self.strategy.min_rounds} rounds.")  # fmt: skip
        self.bundle = bundle
        self.eval_sets = {k: list(v) for k, v in eval_sets.items() if v}
        self.rounds = int(rounds)
        self.local_work = local_work
        self.output_dir = Path(output_dir)
        self.momentum = momentum
        self.seed = int(seed)
        self.server = ServerRound(self.strategy, screen, min_sites)
        self.device = torch.device(device)
        self.overrides = dict(overrides or {})
        self.filters_factory = filters_factory
        self.num_workers = int(num_workers)
        self.progress = progress
        self.label = label
        self.on_round = on_round
        self.faults = FaultInjector(faults)
        self.faults.check_sites(list(self.train_sites))
        self.secure_noise = bool(secure_noise)
        self.partition = partition
        self.round_timeout = round_timeout or None
        self.ledgers = SiteLedgers(ledger_store, fresh_budget)
        self.latents_unprotected = bool(latents_unprotected)
        self.secure = secure_aggregation
        tamper = self.faults.tamper if self.faults.faults else None
        self.transport: InProcessTransport
        if self.secure is not None:
            self.secure.check_run(len(self.train_sites), self.strategy.name, min_sites, sparse=False,
                                  moments=momentum == "aggregate")  # fmt: skip
            from monai_fedpriv.fl.secure import HeldTransport

            self.transport = HeldTransport(tamper=tamper)
        else:
            self.transport = InProcessTransport(tamper=tamper,
                                                tamper_bytes=self.faults.tamper_bytes if self.faults.faults else None)
        if self.secure is None and any(f.kind in ("drop-before-send", "drop-after-send") for f in self.faults.faults):
            raise ValueError("--inject-fault drop-before-send / drop-after-send: these are stages of secure "
                             "aggregation; add --secure-aggregation.")  # fmt: skip
        self.sites: dict[str, Any] = {}
        self.loop: RunLoop | None = None

    @property
    def max_epochs(self) -> int:
        return self.rounds * (self.local_work.epochs or 1)

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoints" / "latest.pt"

    def setup(self) -> None:
        """Build the server's model and every site, and the run loop over them."""
        server_model = ServerModel(self.bundle, self.eval_sets, self.seed, self.device, self.overrides)
        spec = SiteSpec(
            rounds=self.rounds, epochs=self.local_work.epochs, steps=self.local_work.steps, seed=self.seed,
            device=str(self.device), momentum=self.momentum, output_dir=self.output_dir,
            num_workers=self.num_workers, secure_noise=self.secure_noise, overrides=self.overrides,
        )  # fmt: skip
        for name, data in self.train_sites.items():
            with torch.random.fork_rng(devices=[]):
                site = build_site(self.bundle, name, data, spec, self.transport, self.filters_factory)
            self.faults.attach(name, site.trainer, site.round_in_training)
            for change in site.setup.get("dp_network_changes", []):
                self._print(f"{name}: network prepared for DP-SGD: {change}")
            self.sites[name] = site
        if any(site.setup.get("dp_privacy_unit") == "patient" for site in self.sites.values()):
            # a patient at two sites would be counted twice (the public pool is everyone's and never counted)
            check_patients_at_one_site({s: [c for c in v if not is_public(c)] for s, v in self.train_sites.items()})
        weights = server_model.match_sites({n: site.network for n, site in self.sites.items()})
        self._check_exposure()
        keeper = self._server_training()
        channel = InProcessChannel(self.sites, self.transport, server_model, self.local_work, self.max_epochs,
                                   self.ledgers, self.secure_noise, self.round_timeout,
                                   self.latents_unprotected, self._split_server(server_model), keeper,
                                   self._secure_gather())  # fmt: skip
        self.loop = RunLoop(channel, self.server, self.rounds, self._describe_run(), self.output_dir, weights,
                            self.label, log=self._print if self.progress else None, on_round=self.on_round,
                            server_training=keeper)  # fmt: skip

    def _check_exposure(self) -> None:
        """The strategy's rule on what its sites send beyond updates, against the sites as built (``PrivacyConfigError``
        naming the flag): SplitNN and CWT+Replay need ``--latents-unprotected`` and no privacy claim, FedReplay the
        latent mechanism or the opt-in."""
        from monai_fedpriv.errors import PrivacyConfigError

        sites = list(self.sites.values())
        mechanism = any(s.sync.chain.protects_kind("latents") for s in sites)
        private = any(s.dp_sgd or s.sync.chain.protects_kind("update") for s in sites)
        if (problem := self.strategy.exposure_problem(self.latents_unprotected, mechanism, private)) is not None:
            raise PrivacyConfigError(problem)

    def _secure_gather(self) -> Any:
        """Secure aggregation's gather over the built sites (``None`` without it); a site that shares sparse
        updates is refused (``ValueError`` naming the flag)."""
        if self.secure is None:
            return None
        from monai_fedpriv.fl.secure import SecureGather
        from monai_fedpriv.fl.secure.settings import summed_size
        from monai_fedpriv.privacy.filters import PercentileSharing, SparseVectorFilter

        for site in self.sites.values():
            if any(isinstance(f, (PercentileSharing, SparseVectorFilter)) for f in site.sync.chain.filters):
                self.secure.check_run(len(self.sites), self.strategy.name, None, sparse=True, moments=False)

        gather = SecureGather(self.secure, self.seed, lambda name: self.sites[name].privacy_budget,
                              self.secure_noise, self.faults.drops)  # fmt: skip
        gather.reserve(list(self.sites), summed_size(next(iter(self.sites.values())).network.state_dict()))
        return gather

    def _split_server(self, server_model: ServerModel) -> Any:
        """SplitNN: the server part with the bundle's optimiser, and every site's network cut with a link to it."""
        if not self.strategy.splits_network:
            return None
        from monai_fedpriv.bundle.loader import load_bundle
        from monai_fedpriv.fl.split import CodecLink, SplitServer, install_split
        from monai_fedpriv.privacy.grad_sample import plain_copy

        spec = self.bundle.own_configs()
        common = {"device": f"$torch.device('{self.device}')", "seed": self.seed, **self.overrides}
        server = SplitServer(plain_copy(server_model.network),
                             lambda part: load_bundle(spec, {**common, "network": part}).get_parsed_content(
                                 "optimizer"))  # fmt: skip
        for name, site in self.sites.items():
            site.sync.shared_keys = set(install_split(site.trainer.network, CodecLink(name, server)))
        return server

    def _server_training(self) -> Any:
        """What the server keeps of the sites' uploads (FedReplay's pool and training, CWT+Replay's generator),
        after every site was checked to cover what it uploads or to have opted out (``PrivacyConfigError``)."""
        kind = self.strategy.upload_kind
        if not kind:
            return None
        from monai_fedpriv.fl.replay.upload import UNPROTECTED_FLAG

        for site in self.sites.values():
            site.sync.chain.require_covered(kind, self.latents_unprotected, UNPROTECTED_FLAG)
        if kind == "generator":
            from monai_fedpriv.generative.site import install_replay

            for site in self.sites.values():
                install_replay(site)
        from monai_fedpriv.fl.replay.keeper import server_keeper

        return server_keeper(self.strategy, self.bundle, self.seed, self.device, self.overrides,
                             {n: len(d) for n, d in self.train_sites.items()})

    def _print(self, line: str) -> None:
        print(f"[{self.label}] {line}", flush=True)

    def fingerprint(self) -> dict[str, Any]:
        """Every setting that must match for a checkpoint to be resumed (only the number of rounds may grow), as
        the run was set up (a config file edited mid-run does not change it)."""
        return self.loop.fingerprint if self.loop is not None else self._describe_run()

    def _describe_run(self) -> dict[str, Any]:
        described = run_fingerprint(
            self.bundle, self.overrides, self.train_sites, self.local_work, self.momentum, self.strategy,
            self.server, self.seed, self.secure_noise, self.partition,
        )  # fmt: skip
        if self.ledgers.describe() is not None:
            described["ledger_store"] = self.ledgers.describe()
        if self.latents_unprotected:
            described["latents_unprotected"] = True
        if self.secure is not None:
            described["secure_aggregation"] = self.secure.describe()
        return described

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Run all rounds (continuing from the last checkpoint with ``resume=True``); returns the metrics dict.

        Raises:
            FederationError: a round had too few acceptable updates; ``metrics.json`` says why and the checkpoint of
                the last completed round is intact (``resume=True`` continues from it).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self.loop is None:
            self.setup()
        assert self.loop is not None
        if resume:
            self.loop.resume()
            if self.loop.state.round >= self.rounds and self.progress:
                self._print(f"checkpoint already at round {self.loop.state.round} of {self.rounds}: nothing to do.")
        self.ledgers.bind(self.sites, self.train_sites, resumed=resume, log=self._print if self.progress else None)
        self.channel.snapshot()  # the state a failed first round rolls back to: with the ledgers bound
        return self.loop.run()

    @property
    def channel(self) -> InProcessChannel:
        assert self.loop is not None
        return self.loop.channel  # type: ignore[return-value]

    @property
    def history(self) -> list[dict[str, Any]]:
        return self.loop.state.history if self.loop is not None else []

    @property
    def global_weights(self) -> dict[str, torch.Tensor]:
        return self.loop.state.weights if self.loop is not None else {}

    def evaluate_global(self, weights: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Dice of the global model (or of ``weights``) on every evaluation set and their case-weighted mean."""
        return self.channel.server_model.evaluate(self.global_weights if weights is None else weights)

    def write_metrics(self) -> dict[str, Any]:
        assert self.loop is not None
        return self.loop.write_metrics()
