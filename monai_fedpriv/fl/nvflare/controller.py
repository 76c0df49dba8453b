"""The server of an NVIDIA FLARE job: a ``ModelController`` whose ``run()`` is the project's one run loop
(:class:`~monai_fedpriv.fl.workflow.RunLoop`) over FLARE's broadcasts (:class:`~.channel.FlareChannel`): the same
strategy, screening, stop policy, checkpoint format and ``metrics.json`` as the in-process simulator. Its state (the
round checkpoint, ``models/model.pt``, ``metrics.json``) lives under ``<state root>/server``.

Resume: NVFlare 2.9 has no job-level resume, so a resumed federation is a new job of the same settings exported
with ``--resume`` (``run-nvflare --resume`` makes one): the loop reloads the checkpoint (refusing one of other
settings) and continues after the last completed round, and every site restores its own state of that round.
"""

from __future__ import annotations

from pathlib import Path

import torch
from nvflare.app_common.workflows.model_controller import ModelController

from monai_fedpriv.bundle.loader import BundleSpec, parser_get
from monai_fedpriv.errors import FederationError, ResumeError
from monai_fedpriv.fl.nvflare.channel import FlareChannel
from monai_fedpriv.fl.nvflare.settings import JOB_ARCHIVE, JobSettings, open_job_archive
from monai_fedpriv.fl.replay.keeper import server_keeper
from monai_fedpriv.fl.server import ScreenSettings, ServerRound
from monai_fedpriv.fl.simulator.server_model import initial_network
from monai_fedpriv.fl.strategies import build_strategy
from monai_fedpriv.fl.weights import exchangeable_state
from monai_fedpriv.fl.workflow import RunLoop

__all__ = ["FedPrivController", "initial_weights"]


def initial_weights(bundle: BundleSpec, seed: int) -> dict[str, torch.Tensor]:
    """The global model of round 0: the bundle's network built from the run seed, as the simulator builds it, with
    the structure the sites train when they run DP-SGD (BatchNorm replaced the way ``dp.json`` replaces it, affine
    weights kept)."""
    parser, network = initial_network(bundle, seed)
    if parser_get(parser, "dp") is not None:
        from monai_fedpriv.privacy.model_prep import convert_batchnorm

        network, _ = convert_batchnorm(network, norm=parser_get(parser, "dp#norm") or "instance")
    return exchangeable_state(network)


class FedPrivController(ModelController):
    """``run()`` of an exported job (see the module docstring).

    Args:
        job_archive: the job archive's file name in the app's ``custom/`` folder.
    """

    def __init__(self, job_archive: str = JOB_ARCHIVE) -> None:
        super().__init__(persistor_id="", ignore_result_error=True)  # failures are decided by ServerRound
        self.job_archive = job_archive

    def _settings(self) -> tuple[JobSettings, Path]:
        app = Path(self.get_app_dir())
        for folder in (app / "custom", app):
            if (folder / self.job_archive).is_file():
                return open_job_archive(folder / self.job_archive)
        raise FileNotFoundError(f"{self.job_archive} not found in {app}/custom.")

    @staticmethod
    def check_resume(settings: JobSettings, state_dir: Path) -> None:
        """A job that resumes needs the server's checkpoint: never a silent fresh start, or the sites would drop the
        rounds they saved for this resume."""
        if settings.resume and not (state_dir / "checkpoint.pt").is_file():
            raise ResumeError(
                f"this job resumes a federation, but the server has no checkpoint at {state_dir / 'checkpoint.pt'} "
                f"(is $MONAI_FEDPRIV_STATE_ROOT the same as for the earlier job?); export the job without --resume "
                f"to start over."
            )

    def run(self) -> None:
        settings, job_dir = self._settings()
        state_dir = settings.state_root() / "server"
        self.check_resume(settings, state_dir)
        bundle = BundleSpec(job_dir / settings.bundle, tuple(settings.config_files), dict(settings.overrides))
        strategy = build_strategy(**settings.strategy)
        cases = {site: len(settings.data.get(site, {}).get("train", [])) for site in settings.sites}
        strategy.site_data({site: settings.data.get(site, {}).get("train", []) for site in settings.sites},
                           settings.seed)  # what FedReplay's encoder-site choice and CWT+Replay's visits count
        keeper = server_keeper(strategy, bundle, settings.seed, "cpu", settings.overrides, cases)
        server = ServerRound(strategy, ScreenSettings(**settings.screen), settings.min_sites)
        channel = FlareChannel(self, settings, bundle, server.required, keeper)
        weights = {} if settings.resume else initial_weights(bundle, settings.seed)
        loop = RunLoop(channel, server, settings.rounds, settings.describe(), state_dir, weights,
                       label="federated (NVIDIA FLARE)", checkpoint=state_dir / "checkpoint.pt", log=self.info,
                       server_training=keeper)  # fmt: skip
        try:
            loop.run(resume=settings.resume)
        except FederationError as exc:
            self.error(str(exc))
