"""Deployment on NVIDIA FLARE 2.9 (optional dependency ``nvflare``): export a federated run of a bundle as a job
(:mod:`.job`), the server controller that runs the project's server round (:mod:`.controller`), the site loop over
the Client API (:mod:`.client`, :mod:`.transport`) and local runs in FLARE's simulator or POC mode (:mod:`.runner`).

Importing this package does not import ``nvflare``; the modules that need it do.
"""

from monai_fedpriv.fl.nvflare.settings import JOB_FILE, JobSettings

__all__ = ["JOB_FILE", "JobSettings"]
