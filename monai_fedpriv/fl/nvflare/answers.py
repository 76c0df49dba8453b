"""What a site's NVIDIA FLARE answer says besides its update: its round ``result``, its ``setup``, its score of the
last global model (``global``) and a ``failed`` reason, all site-controlled. :func:`read_answer` checks them before
the controller uses any of them, and a malformed value becomes that site's rejection
(:class:`MalformedAnswer`, one line), never the end of the round.

Example::

    read_answer({"client_name": "site-1", "result": "x"})
    # MalformedAnswer: malformed answer: result field is a str, expected an object
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monai_fedpriv.errors import UpdateError

__all__ = [
    "MAX_FIELD_BYTES", "MAX_REASON_CHARS", "Answer", "MalformedAnswer", "Rejected", "client_name", "privacy_problem",
    "read_answer",
]  # fmt: skip

MAX_FIELD_BYTES = 64 * 1024  # the JSON size of one of result, global, setup
MAX_REASON_CHARS = 500  # a site's failure reason is cut to this


class Rejected(UpdateError):
    """A site's answer is rejected; the message is the site's one-line rejection reason."""


class MalformedAnswer(Rejected):
    """A site's answer meta is not what a site sends."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"malformed answer: {problem}")


@dataclass
class Answer:
    """The checked parts of one answer: ``result`` (the site's round entry), ``setup`` (or ``None``), ``scored`` (its
    score of the last global model, ``{}`` when none) and ``failed`` (its failure reason, or ``None``)."""

    result: dict[str, Any] = field(default_factory=dict)
    setup: dict[str, Any] | None = None
    scored: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None


def _kind(value: Any) -> str:
    return type(value).__name__


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


def _object(meta: Mapping[str, Any], key: str) -> dict[str, Any] | None:
    """``meta[key]`` as a bounded dict (``None`` when absent or empty)."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise MalformedAnswer(f"{key} field is a {_kind(value)}, expected an object")
    try:
        size = len(json.dumps(value, allow_nan=True, default=str))
    except Exception as exc:  # noqa: BLE001 - unserialisable or too deep
        raise MalformedAnswer(f"{key} field cannot be read as JSON ({type(exc).__name__})") from None
    if size > MAX_FIELD_BYTES:
        raise MalformedAnswer(f"{key} field takes {size} bytes, more than {MAX_FIELD_BYTES}")
    return dict(value) or None


def privacy_problem(privacy: Any) -> str | None:
    """Why ``privacy`` (a site's privacy report) is malformed, or ``None``: it is an object whose ``epsilon`` and
    ``delta`` are finite numbers or absent."""
    if not isinstance(privacy, dict):
        return f"privacy is a {_kind(privacy)}, expected an object"
    for key in ("epsilon", "delta"):
        value = privacy.get(key)
        if value is not None and not _finite(value):
            return f"privacy {key} is {_show(value)}, expected a finite number"
    return None


def _show(value: Any) -> str:
    return repr(value)[:40] if _is_number(value) else f"a {_kind(value)}"


def _check_result(result: dict[str, Any]) -> None:
    for key in ("loss", "dice"):  # NaN is what a diverged or empty site measures; any other number is fine
        if key in result and not (_is_number(result[key]) and not math.isinf(result[key])):
            raise MalformedAnswer(f"result {key} is {_show(result[key])}, expected a number")
    if "privacy" in result and (problem := privacy_problem(result["privacy"])):
        raise MalformedAnswer(f"result {problem}")


def _check_scored(scored: dict[str, Any]) -> None:
    if "global_dice" not in scored:
        return
    if not _finite(scored["global_dice"]):
        raise MalformedAnswer(f"global global_dice is {_show(scored['global_dice'])}, expected a finite number")
    n_cases = scored.get("n_cases", 1)
    if not (isinstance(n_cases, int) and not isinstance(n_cases, bool) and n_cases >= 0):
        raise MalformedAnswer(f"global n_cases is {_show(n_cases)}, expected a count")
    per_class, classes = scored.get("dice_per_class", []), scored.get("classes", [])
    if not isinstance(per_class, list) or not all(_is_number(v) and not math.isinf(v) for v in per_class):
        raise MalformedAnswer("global dice_per_class is not a list of numbers")
    if not isinstance(classes, list) or not all(isinstance(c, (str, int)) for c in classes):
        raise MalformedAnswer("global classes is not a list of names")
    if "metric" in scored and not isinstance(scored["metric"], (str, type(None))):
        raise MalformedAnswer(f"global metric is a {_kind(scored['metric'])}, expected a string")


def client_name(res: Any) -> str:
    """The site an answer comes from (as NVFlare names it; anything unreadable names no site)."""
    try:
        return str(dict(res.meta or {}).get("client_name"))
    except Exception:  # noqa: BLE001
        return "None"


def read_answer(meta: Any) -> Answer:
    """The checked :class:`Answer` of one site's answer ``meta``; raises :class:`MalformedAnswer` (one line) when a
    site-controlled field is not what a site sends."""
    if not isinstance(meta, Mapping):
        raise MalformedAnswer(f"meta is a {_kind(meta)}, expected an object")
    result = _object(meta, "result") or {}
    _check_result(result)
    setup = _object(meta, "setup")
    scored = _object(meta, "global") or {}
    _check_scored(scored)
    failed = meta.get("failed")
    reason = None
    if failed:
        reason = " ".join(str(failed).split())[:MAX_REASON_CHARS] or "failed"
    return Answer(result, setup, scored, reason)
