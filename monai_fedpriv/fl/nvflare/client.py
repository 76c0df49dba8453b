"""A site of an NVIDIA FLARE job: the bundle's own trainer with :class:`~monai_fedpriv.handlers.FederatedSync`,
driven round by round from the server's tasks.

The site is built exactly as the in-process simulator builds it (:func:`~monai_fedpriv.fl.simulator.site.build_site`)
and trains each round with the same :func:`~monai_fedpriv.fl.simulator.site.train_round` (budget stops, partial
rounds, roll-back of a failed round), so a job and a simulation with the same settings train the same. Each task is
answered with the update's codec bytes (or none) and what the site reports: its loss and local Dice, the Dice of the
global model it received on its own validation cases, a stop or a failure.

The site keeps its own state (``<state root>/<site>``): before it answers round ``r`` it saves one file with its
state after the round (engine, optimiser, sampler, random state, DP generators, privacy ledger) and the exact bytes
it sends. A new job that resumes the federation (exported with ``--resume``) after the server's last completed
round ``s`` restores the site's file of round ``s + 1`` when there is one and sends its saved bytes again (the same
release, no new privacy spent), or else its file of round ``s`` and trains round ``s + 1`` from there. A process
killed in the middle of a round released nothing of that round (its noisy steps never left its memory), so the
round is trained again from the saved state.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

from monai_fedpriv.bundle.loader import BundleSpec, load_bundle
from monai_fedpriv.data.share_pool import SHARING_STRATEGY, refuse_public
from monai_fedpriv.errors import ResumeError
from monai_fedpriv.fl.evaluation import DiceEvaluator, evaluator_from_bundle
from monai_fedpriv.fl.nvflare.integrity import JobIntegrityError, refuse_job, verify_job
from monai_fedpriv.fl.nvflare.settings import JOB_ARCHIVE, JobSettings, open_job_archive
from monai_fedpriv.fl.nvflare.transport import NVFlareTransport, Task
from monai_fedpriv.fl.simulator.faults import FaultInjector, parse_fault
from monai_fedpriv.fl.simulator.site import SiteRuntime, SiteSpec, build_site
from monai_fedpriv.fl.simulator.site_round import train_round
from monai_fedpriv.fl.strategies import build_strategy
from monai_fedpriv.fl.weights import exchangeable_state, load_exchangeable_state
from monai_fedpriv.generative.site import fill_replay, read_generator
from monai_fedpriv.privacy.grad_sample import plain_copy
from monai_fedpriv.privacy.ledger_store import FRESH_ENV, LedgerStore, new_run_id
from monai_fedpriv.utils.files import atomic_torch_save, atomic_write_text

__all__ = ["SiteStateStore", "main", "run_site"]

logger = logging.getLogger("monai_fedpriv.nvflare.client")


class SiteStateStore:
    """A site's own round files between jobs: ``round_<r>.pt`` = its state after round ``r`` and what it sent
    (the last two rounds kept)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        for path in self.root.glob("round_*.pt"):
            path.unlink(missing_ok=True)
        (self.root / "run_id").unlink(missing_ok=True)

    def run_id(self) -> str:
        """This federation's identity in the site's ledger store: kept across the jobs that resume it, new after
        :meth:`clear`."""
        path = self.root / "run_id"
        if not path.is_file():
            atomic_write_text(new_run_id(), path)
        return path.read_text().strip()

    def save(self, rnd: int, state: dict[str, Any], release: bytes | None, meta: dict[str, Any]) -> None:
        """Save the state after round ``rnd`` with the bytes and meta of its answer, in one atomic write."""
        atomic_torch_save({"state": state, "release": release, "meta": meta}, self.root / f"round_{rnd}.pt")
        for old in self.root.glob("round_*.pt"):
            if int(old.stem.split("_")[1]) < rnd - 1:
                old.unlink(missing_ok=True)

    def latest_at_most(self, rnd: int) -> tuple[int, dict[str, Any]] | None:
        """``(round, saved record)`` of the latest round file not after ``rnd``."""
        rounds = sorted(int(p.stem.split("_")[1]) for p in self.root.glob("round_*.pt"))
        rounds = [r for r in rounds if r <= rnd]
        if not rounds:
            return None
        record = torch.load(self.root / f"round_{rounds[-1]}.pt", map_location="cpu", weights_only=False)
        return rounds[-1], record


def _job_archive() -> Path:
    here = Path(sys.argv[0]).resolve().parent if sys.argv and sys.argv[0] else Path.cwd()
    for candidate in (here, here / "custom", Path.cwd() / "custom", Path.cwd()):
        if (candidate / JOB_ARCHIVE).is_file():
            return candidate / JOB_ARCHIVE
    raise FileNotFoundError(f"{JOB_ARCHIVE} not found next to the client script ({here}) or in {Path.cwd()}/custom.")


class _Site:
    """The site of this process and how it scores models on its own validation cases."""

    def __init__(
        self, settings: JobSettings, job_dir: Path, name: str, transport: NVFlareTransport, faults: FaultInjector
    ) -> None:
        self.settings = settings
        self.name = name
        train, val = settings.site_data(name)
        if settings.strategy.get("name") != SHARING_STRATEGY:  # only FedAvg+Share's pool may be public
            refuse_public({name: train})
        self.train = train
        self.bundle = BundleSpec(job_dir / settings.bundle, tuple(settings.config_files), dict(settings.overrides))
        self.spec = SiteSpec(
            rounds=settings.rounds, epochs=settings.local_epochs, steps=settings.local_steps, seed=settings.seed,
            device="cpu", momentum=settings.momentum, output_dir=settings.state_root() / "run",
            secure_noise=settings.secure_noise,
        )  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            self.site: SiteRuntime = build_site(self.bundle, name, train, self.spec, transport)
        faults.attach(name, self.site.trainer, self.site.round_in_training)
        self.mix = None
        if build_strategy(**settings.strategy).upload_kind == "generator":  # CWT+Replay: replay joins the stream
            from monai_fedpriv.generative.site import install_replay

            self.mix = install_replay(self.site)
        self.max_epochs = settings.rounds * (settings.local_epochs or 1)
        self.evaluator = self._evaluator(val)

    def _evaluator(self, val: list[dict[str, Any]]) -> DiceEvaluator | None:
        if not val:
            return None
        return evaluator_from_bundle(load_bundle(self.bundle, {"device": "$torch.device('cpu')"}), val, "cpu")

    def score_global(self, task: Task) -> dict[str, Any]:
        """Dice of the task's global model on this site's validation cases."""
        if self.evaluator is None:
            return {}
        network = plain_copy(self.site.network)
        load_exchangeable_state(network, task.model.weights)
        result = self.evaluator(network)
        return {"global_dice": result["dice"], "n_cases": result["n_cases"], "dice_per_class": result["dice_per_class"],
                "classes": result["classes"], "metric": self.evaluator.describe()}  # fmt: skip


def run_site(archive: Path) -> None:
    """The site's task loop (see the module docstring)."""
    try:  # before anything of the job is parsed or built: an edited or unaccepted job runs none of its configs
        verify_job(archive, Path(sys.argv[0]))
    except JobIntegrityError as exc:
        refuse_job(str(exc))
        return
    settings, job_dir = open_job_archive(archive)
    faults = FaultInjector([parse_fault(f) for f in settings.faults])
    transport = NVFlareTransport(tamper=faults.tamper if faults.faults else None,
                                 tamper_bytes=faults.tamper_bytes if faults.faults else None)  # fmt: skip
    transport.flare.init()
    name = transport.site_name()
    site = _Site(settings, job_dir, name, transport, faults)
    transport.expect(exchangeable_state(site.site.network))  # a global model of another shape is refused unread
    store = SiteStateStore(settings.state_root() / name)
    secure = _secure_site(site, settings, faults)
    snapshot = site.site.snapshot()
    replay: tuple[int, bytes, dict[str, Any]] | None = None
    first = True
    while True:
        task = transport.pull()
        if task is None:
            break
        if first:
            first = False
            if not settings.resume or task.model.round == 0:  # a new federation: nothing of an earlier one counts
                store.clear()
            # a site's first task may come after round 1 (cyclic weight transfer): only a resumed job restores
            restored = _restore(site, store, task.model.round, task.meta) if settings.resume else None
            if restored is not None:
                snapshot, replay = restored
            _bind_ledger(site, store, resumed=restored is not None)
            snapshot = site.site.snapshot()
        if task.name == "validate":
            transport.reply_bytes(None, {"validate": True, "global": site.score_global(task)})
            continue
        if secure is not None and task.name.startswith("secagg_"):  # a stage of this round's secure sum
            try:
                transport.reply_bytes(secure.stage(task.name, task.extras), {"round": task.meta.get("round")})
            except Exception as exc:  # noqa: BLE001 - this site drops out of the stage; nothing of it is sent
                logger.warning(f"{name}: {task.name} failed: {exc}"[:400])
                transport.reply_bytes(None, {"failed": f"{task.name}: {exc}"[:300]})
            continue
        rnd = task.model.round + 1
        if replay is not None and replay[0] == rnd:  # answered before the last job ended: the same bytes again
            transport.reply_bytes(replay[1], replay[2])
            replay = None
            continue
        meta = _train(site, rnd, task, transport, snapshot)
        snapshot = site.site.snapshot()
        if secure is not None:  # the update stays here; the answer is the site's public keys for the secure sum
            held = transport.pending.pop(name, None)
            blob = None
            if held is not None and held[1] is not None and not meta.get("failed"):
                try:
                    blob = secure.join(name, rnd, task.meta.get("secagg"), held[1], task.model.weights)
                except Exception as exc:  # noqa: BLE001 - a refused release or a bad session: nothing is sent
                    meta["failed"] = f"secure aggregation: {type(exc).__name__}: {exc}"[:300]
            if site.site.budgets and isinstance(meta.get("result"), dict):  # with the distributed-DP release
                meta["result"]["privacy"] = site.site.privacy_facts()
            store.save(rnd, snapshot, None, meta)
            transport.reply_bytes(blob, meta)
            continue
        blob, meta = transport.answer(name, meta)
        store.save(rnd, snapshot, blob, meta)  # saved before anything leaves the site
        transport.reply_bytes(blob, meta)
    site.site.release_engine()
    site.site.save_ledgers()


def _secure_site(site: _Site, settings: JobSettings, faults: FaultInjector) -> Any:
    """The site's secure-aggregation state (``None`` without it), its distributed-DP release reserved."""
    if settings.secure_aggregation is None:
        return None
    from monai_fedpriv.fl.nvflare.secure_site import SecureSite
    from monai_fedpriv.fl.secure.settings import summed_size

    budget = site.site.privacy_budget
    secure = SecureSite(settings.secure_aggregation, settings.seed, settings.secure_noise, budget, faults.drops)
    secure.settings.reserve(site.name, budget, len(settings.sites), summed_size(site.site.network.state_dict()))
    return secure


def _bind_ledger(site: _Site, store: SiteStateStore, resumed: bool) -> None:
    """The site's budget carries what earlier jobs spent on its cases, from the ledger store its own operator chose
    (``$MONAI_FEDPRIV_LEDGER_DIR``, else ``~/.monai_fedpriv/ledgers``); only the site's own environment
    (``MONAI_FEDPRIV_FRESH_BUDGET=1``) can start a fresh budget, never the job."""
    fresh = os.environ.get(FRESH_ENV, "").strip().lower() in ("1", "true", "yes")
    facts = site.site.bind_ledger_store(LedgerStore.default(), store.run_id(), site.train, fresh=fresh,
                                        resumed=resumed)  # fmt: skip
    if facts is not None:
        site.site.setup["ledger_store"] = facts
        if facts["carried_epsilon"] > 0:
            logger.warning(f"{site.name}: earlier runs on its data spent epsilon {facts['carried_epsilon']:.4f} "
                           f"(ledger store {facts['dir']}); its budget counts it")  # fmt: skip


def _train(site: _Site, rnd: int, task: Task, transport: NVFlareTransport, snapshot: dict[str, Any]) -> dict[str, Any]:
    """Train round ``rnd`` (or report that the site has stopped); returns the answer's meta."""
    meta: dict[str, Any] = {"round": rnd}
    if task.model.round > 0:  # the previous round's global model, scored on this site's cases
        meta["global"] = site.score_global(task)
    if site.site.setup:
        meta["setup"] = site.site.setup
    if not site.site.active:
        meta["result"] = {"stopped": "the site stopped earlier", "privacy": site.site.privacy_facts()}
        return meta
    phase = task.model.instruction_for(site.name).phase
    generator = read_generator(task.extras["generator"]) if "generator" in task.extras else None
    if phase in ("upload", "generator"):
        return _upload(site, rnd, task, transport, generator, meta)
    if generator is not None and site.mix is not None:  # CWT+Replay: this round's replayed pairs
        with site.site.rng.active():
            fill_replay(site.site, site.mix, generator, rnd, site.settings.seed)
    result, _, failure = train_round(site.site, rnd, transport, snapshot, site.max_epochs, site.evaluator)
    meta["result"] = result
    if failure:
        meta["failed"] = failure
    return meta


def _upload(site: _Site, rnd: int, task: Task, transport: NVFlareTransport, generator: Any,
            meta: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """FedReplay's latent upload or CWT+Replay's generator visit, through the site's filters; its bytes answer the
    task (a failure is the answer's ``failed``, nothing is sent)."""
    from monai_fedpriv.fl.codec import encode
    from monai_fedpriv.fl.replay.upload import upload_message

    try:
        message = upload_message(site.site, task.model, rnd, site.settings.seed, site.settings.latents_unprotected,
                                 generator)  # fmt: skip
        transport.send_message(site.name, encode(message))
        meta["result"] = {"privacy": site.site.privacy_facts()} if site.site.budgets else {}
    except Exception as exc:  # noqa: BLE001 - the site's failure, reported; nothing was sent
        logger.warning(f"{site.name}: its upload of round {rnd} failed: {exc}")
        meta["result"] = {"privacy": site.site.privacy_facts()} if site.site.budgets else {}
        meta["failed"] = f"upload failed: {type(exc).__name__}: {exc}"
    return meta


def _restore(
    site: _Site, store: SiteStateStore, server_round: int, meta: dict[str, Any]
) -> tuple[dict[str, Any], tuple[int, bytes, dict[str, Any]] | None] | None:
    """The site's saved state for a federation resumed after ``server_round``, and the answer to send again.

    Whatever the site saved is restored (its privacy ledger above all: a release it made is never forgotten). The
    task's ``last_trained`` (the last round the server's history asked this site to train) says how recent that state
    must be: a strategy that does not train every site every round (cyclic weight transfer) leaves a site's latest
    state older than the server's round, and a site the server never asked may have none."""
    if server_round == 0:
        return None
    last = meta.get("last_trained")
    last = last.get(site.name, -1) if isinstance(last, dict) else server_round
    found = store.latest_at_most(server_round + 1)
    if found is None and last == -1:  # never asked to train and nothing saved: it joins now
        return None
    if found is None:
        raise ResumeError(
            f"{site.name}: the server resumes after round {server_round} but this site has no saved state in "
            f"{store.root}; restore its state folder or start a new run."
        )
    rnd, record = found
    state = record["state"]
    if rnd < min(max(int(last), 0), server_round) and state.get("active", True):
        raise ResumeError(
            f"{site.name}: the server resumes after round {server_round} but this site's last saved state is of round "
            f"{rnd}; it cannot rejoin consistently."
        )
    site.site.load_state_dict(state, site.max_epochs)
    replay = None
    if rnd == server_round + 1 and record.get("release") is not None:
        replay = (rnd, bytes(record["release"]), dict(record["meta"]))
    logger.warning(
        f"{site.name}: resumed from its state after round {rnd} ({store.root})"
        + ("; its answer of that round is sent again" if replay else "")
    )
    return site.site.snapshot(), replay


def main() -> None:
    """Entry point of the client script an exported job runs (``custom/fedpriv_client.py``)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        run_site(_job_archive())
    except BaseException:  # noqa: BLE001 - an external trainer that raises must exit, or FLARE waits for it
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os._exit(0)
