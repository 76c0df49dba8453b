"""A FLARE site's side of secure aggregation: after training it encodes its update (charging distributed DP in its
ledger first), keeps the vector and its :class:`~monai_fedpriv.secagg.client.SecAggClient`, and answers the round's
``train`` task with its public keys instead of its update, then each stage task (:data:`.secure_stages.STAGES`).
Stage messages from the server are decoded as hostile input; the site's keys and seeds never leave it."""

from __future__ import annotations

from typing import Any

from monai_fedpriv.fl.secure import SecureAggregation, SecureRound
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.secagg.client import SecAggClient
from monai_fedpriv.secagg.wire import decode_message, encode_message

__all__ = ["SecureSite"]


class SecureSite:
    """One FLARE site's secure-aggregation state, round by round."""

    def __init__(self, fields: dict[str, Any], seed: int, secure_noise: bool, budget: Any,
                 drops: Any = None) -> None:  # fmt: skip
        self.settings = SecureAggregation(**fields)
        self.seed, self.secure_noise, self.budget = int(seed), bool(secure_noise), budget
        self.drops: Any = drops or (lambda _rnd: {})  # injected drop-before-send / drop-after-send faults (testing)
        self.plan: SecureRound | None = None
        self.client: SecAggClient | None = None
        self.vector: Any = None


    def join(self, name: str, rnd: int, public: Any, update: ModelUpdate, weights: dict[str, Any]) -> bytes:
        """After training round ``rnd``: the encoded update is kept, the site's public keys are the answer."""
        if not isinstance(public, dict) or not isinstance(public.get("sites"), list):
            raise ValueError("the round's task carries no secure-aggregation session")
        sites = tuple(str(s) for s in public["sites"])
        self.plan = SecureRound(self.settings, self.seed, rnd, sites, weights, str(public.get("session_id")))
        self.vector = self.plan.site_vector(update, self.plan.rng(name, self.secure_noise),
                                            self.settings.charge(name, self.budget))
        self.client = SecAggClient(name, self.plan.session)
        return encode_message(self.client.advertise(), self.settings.bits)

    def stage(self, task: str, params: dict[str, bytes]) -> bytes:
        """The answer to one stage task (``ValueError`` when the site cannot or will not answer)."""
        if self.plan is None or self.client is None:
            raise ValueError(f"{task} without a round this site joined")
        session, bits = self.plan.session, self.settings.bits
        drop = self.drops(self.plan.round).get(self.client.site)
        if (task, drop) in (("secagg_input", "drop-before-send"), ("secagg_unmask", "drop-after-send")):
            raise ValueError(f"{drop} (injected fault)")
        if task == "secagg_keys":
            adverts = {}
            for key, raw in params.items():
                if key.startswith("advert:"):
                    advert = decode_message(raw, session, "advert")
                    adverts[advert.site] = advert
            return encode_message(self.client.share_keys(adverts), bits)
        if task == "secagg_input":
            mine = f"packet:{self.client.site}:"
            packets = {key[len(mine) :]: raw for key, raw in params.items() if key.startswith(mine)}
            unknown = [s for s in packets if s not in session.sites]
            if unknown:
                raise ValueError(f"share packets from sites outside the round: {unknown[:3]}")
            return encode_message(self.client.masked_input(packets, self.vector), bits)
        if task == "secagg_unmask":
            request = decode_message(params.get("request", b""), session, "request")
            answer = self.client.unmask(request)
            self.vector, self.client = None, None
            return encode_message(answer, bits)
        raise ValueError(f"unknown secure-aggregation task {task!r}")
