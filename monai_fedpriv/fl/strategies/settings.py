"""Every strategy's settings, each a dataclass whose fields carry their command-line flag, help and range: the one
place a strategy setting is defined. The CLI builds its flags from these fields (:mod:`monai_fedpriv.cli.strategy`),
the plan validates through them, the NVIDIA FLARE job stores them, and ``metrics.json`` reports them under
``"strategy"``. Adding a setting to a strategy is adding one field here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "CWTReplaySettings", "CWTSettings", "FedAvgMSettings", "FedAvgSettings", "FedAvgShareSettings", "FedProxSettings",
    "FedReplaySettings", "MedianSettings", "SplitNNSettings", "TrimmedMeanSettings", "WEIGHTINGS", "check_settings",
    "setting",
]  # fmt: skip

WEIGHTINGS = ("steps", "samples", "uniform")


def setting(default: Any, flag: str, help: str, *, low: float | None = None, high: float | None = None,
            low_open: bool = False, high_open: bool = False, choices: tuple[str, ...] | None = None,
            text: bool = False) -> Any:
    """A settings field with its flag, help and range (``low``/``high`` inclusive unless ``*_open``; ``text``: a
    free string, a site name, checked where it is used)."""
    meta = {"flag": flag, "help": help, "low": low, "high": high, "low_open": low_open, "high_open": high_open,
            "choices": choices, "text": text}  # fmt: skip
    return field(default=default, metadata=meta)


def _problem(value: Any, meta: dict[str, Any]) -> str | None:
    if meta.get("text"):
        return None if isinstance(value, str) and len(value) <= 64 else "should be a name of at most 64 characters"
    if meta["choices"] is not None:
        return None if value in meta["choices"] else f"should be one of {list(meta['choices'])}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return "should be a finite number"
    low, high = meta["low"], meta["high"]
    if low is not None and (value < low or (meta["low_open"] and value == low)):
        return f"should be {'>' if meta['low_open'] else '>='} {low:g}"
    if high is not None and (value > high or (meta["high_open"] and value == high)):
        return f"should be {'<' if meta['high_open'] else '<='} {high:g}"
    return None


def check_settings(settings: Any) -> None:
    """Raise ``ValueError`` naming the flag and value of the first setting out of its range."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if (problem := _problem(value, dict(f.metadata))) is not None:
            raise ValueError(f"{f.metadata['flag']} {value!r}: {problem}.")


_WEIGHTING = "FedAvg weights: local steps (Li et al. 2019, Alg. 3), samples, or the plain mean (default steps)"
_SERVER_LR = "server step size on the aggregated update (default 1)"


@dataclass(frozen=True)
class FedAvgSettings:
    weighting: str = setting("steps", "--weighting", _WEIGHTING, choices=WEIGHTINGS)
    server_lr: float = setting(1.0, "--server-lr", _SERVER_LR, low=0, low_open=True)


@dataclass(frozen=True)
class FedAvgMSettings(FedAvgSettings):
    momentum: float = setting(0.9, "--server-momentum", "FedAvgM server momentum in [0, 1) (default 0.9)",
                              low=0, high=1, high_open=True)  # fmt: skip


@dataclass(frozen=True)
class FedProxSettings(FedAvgSettings):
    prox_mu: float = setting(0.01, "--prox-mu", "FedProx proximal weight mu >= 0 (Li et al. 2020; 0 is FedAvg; "
                             "default 0.01)", low=0, high=1e6)  # fmt: skip


@dataclass(frozen=True)
class FedAvgShareSettings(FedAvgSettings):
    share_data_fraction: float = setting(
        0.05, "--share-data-fraction", "FedAvg+Share: fraction of each site's training cases drawn into a public pool "
        "mixed into every site's batches (Zhao et al. 2018; default 0.05)", low=0, high=0.5, low_open=True,
    )  # fmt: skip


@dataclass(frozen=True)
class CWTSettings:
    """Cyclic weight transfer has no settings: one site per round in site order, ``floor(|D_k| / b)`` steps."""


@dataclass(frozen=True)
class SplitNNSettings:
    """SplitNN has no settings: a U-shaped cut after the first block, one site per round in site order."""


@dataclass(frozen=True)
class FedReplaySettings:
    cut_block: int = setting(1, "--cut-block", "FedReplay: encoding blocks in the sites' encoder (seed 004 cuts after "
                             "the first; default 1; SplitNN's U-shaped cut is after the first)", low=1,
                             high=8)  # fmt: skip
    encoder_site: str = setting("", "--encoder-site", "FedReplay: the site that trains the auxiliary encoder "
                                "(default: the one with the most training cases)", text=True)  # fmt: skip
    encoder_rounds: int = setting(1, "--encoder-rounds", "FedReplay: rounds (one epoch each) of encoder training at "
                                  "the encoder site (default 1)", low=1, high=1000)  # fmt: skip
    server_epochs: int = setting(1, "--server-epochs", "FedReplay: passes over the pooled latents per server round "
                                 "(default 1)", low=1, high=1000)  # fmt: skip


@dataclass(frozen=True)
class CWTReplaySettings:
    generator_epochs: int = setting(1, "--generator-epochs", "CWT+Replay: local epochs of the generator at each site's "
                                    "visit (default 1)", low=1, high=1000)  # fmt: skip


@dataclass(frozen=True)
class MedianSettings:
    server_lr: float = setting(1.0, "--server-lr", _SERVER_LR, low=0, low_open=True)


@dataclass(frozen=True)
class TrimmedMeanSettings(MedianSettings):
    trim_fraction: float = setting(
        0.2, "--trim-fraction", "trimmed-mean: fraction dropped at each end per coordinate, in [0, 0.5) (default 0.2)",
        low=0, high=0.5, high_open=True,
    )  # fmt: skip
