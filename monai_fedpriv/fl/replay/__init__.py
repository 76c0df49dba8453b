"""FedReplay's two sides (seed 004, Algorithm 2): a site's one-time upload of its latents with their labels
(:mod:`.upload`), and training of the primary model at the server on the pooled latents (:mod:`.server_phase`)."""

from monai_fedpriv.fl.replay.server_phase import LatentTrainer
from monai_fedpriv.fl.replay.upload import site_upload

__all__ = ["LatentTrainer", "site_upload"]
