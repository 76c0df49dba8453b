"""Secure aggregation over NVIDIA FLARE: the round's ``train`` task carries the session (``meta["secagg"]``) and each
site answers with its public keys instead of its update; three more broadcasts carry the keys, the sealed share
packets and the unmask request (``STAGES``); the server unmasks the survivors' sum (:mod:`monai_fedpriv.secagg`).
Every answer is decoded as hostile input (:mod:`monai_fedpriv.secagg.wire`): a malformed or missing one drops that
site, never the round, until fewer than the threshold remain (then the round fails cleanly).
"""

from __future__ import annotations

from typing import Any

from monai_fedpriv.fl.nvflare.answers import client_name, read_answer
from monai_fedpriv.fl.secure.gather import SecureOutcome, SecureRound
from monai_fedpriv.fl.workflow.channel import Gathered, RoundRequest
from monai_fedpriv.secagg import SecAggError, SecAggServer
from monai_fedpriv.secagg.wire import decode_message, encode_message

__all__ = ["STAGES", "secure_gather"]

STAGES = ("secagg_keys", "secagg_input", "secagg_unmask")


def secure_gather(channel: Any, request: RoundRequest, blob: bytes, extras: dict[str, bytes]) -> Gathered:
    """One training round under secure aggregation, over ``channel``'s broadcasts (a :class:`FlareChannel`)."""
    secure = channel.secure
    plan = SecureRound(secure, channel.settings.seed, request.round, tuple(request.targets), request.model.weights)
    results = channel._broadcast("train", blob, request.targets, request.round, request.last_trained, extras,
                                 secagg=plan.public())  # fmt: skip
    size = len(blob) + sum(len(v) for v in extras.values())
    got = Gathered(received_bytes={name: size for name in request.targets})
    bits, sent = secure.bits, {}
    adverts = {}
    for res in results:
        name = client_name(res)
        if name not in request.targets or name in got.sites:
            continue
        try:
            answer = read_answer(dict(res.meta or {}))
            got.sites[name] = answer.result
            channel._note(name, answer.setup, answer.scored, answer.result)
            if answer.scored:
                got.scored[name] = answer.scored
            got.expected.append(name)
            if answer.failed:
                got.failures[name] = answer.failed
                continue
            raw = (res.params or {}).get("update")
            if not isinstance(raw, (bytes, bytearray)):
                raise ValueError("no keys in the answer")
            advert = decode_message(bytes(raw), plan.session, "advert")
            if advert.site != name:
                raise ValueError(f"{name} answered with the keys of {advert.site}")
            adverts[name], sent[name] = advert, len(raw)
        except Exception as exc:  # noqa: BLE001 - a malformed answer drops this site, never the round
            got.failures[name] = f"malformed answer: {exc}"[:500]
            got.sites.setdefault(name, {})
        if (got.sites.get(name) or {}).get("stopped"):
            got.left.append(name)
    for name in request.targets:
        if name not in got.sites:
            got.failures[name] = f"no answer within the round's timeout ({channel.settings.round_timeout} s)"
            got.expected.append(name)
    server = SecAggServer(plan.session, plan.coding.padded)
    received = dict(got.received_bytes)
    try:
        public = server.collect_adverts(list(adverts.values()))
        keys = {f"advert:{s}": encode_message(a, bits) for s, a in public.items()}
        shares = _stage(channel, request, plan, "secagg_keys", keys, list(public), "shares", sent, received)
        routed = server.route(list(shares.values()))
        packets = {f"packet:{to}:{frm}": p for to, m in routed.items() for frm, p in m.items()}
        masked = _stage(channel, request, plan, "secagg_input", packets, list(routed), "masked", sent, received,
                        plan.coding.padded)  # fmt: skip
        unmask = server.collect_inputs(list(masked.values()))
        asked = {"request": encode_message(unmask, bits)}
        answers = _stage(channel, request, plan, "secagg_unmask", asked, list(unmask.survivors), "unmask", sent,
                         received)  # fmt: skip
        total = server.unmask(list(answers.values()))
    except (SecAggError, ValueError) as exc:
        got.secure = SecureOutcome(None, [], dict(got.failures), failed=f"round {request.round}: secure aggregation "
                                   f"failed: {exc}", threshold=plan.session.threshold)  # fmt: skip
        return got
    got.received_bytes = {n: received[n] for n in request.targets}  # the global model and every stage
    dropped = {**got.failures, **{n: "sent no masked input" for n in public if n not in masked}}
    got.secure = SecureOutcome(plan.mean_delta(total, len(unmask.survivors)), list(unmask.survivors), dropped, sent,
                               {n: received[n] - size for n in received}, threshold=plan.session.threshold,
                               left_after=[s for s in unmask.survivors if s not in answers],
                               near_edge=plan.coding.near_edge(total))  # fmt: skip
    return got


def _stage(channel: Any, request: RoundRequest, plan: SecureRound, task: str, params: dict[str, bytes],
           targets: list[str], kind: str, sent: dict[str, int], received: dict[str, int],
           size: int | None = None) -> dict[str, Any]:  # fmt: skip
    """One stage: ``params`` to ``targets``, their answers decoded as ``kind`` (a site whose answer is missing or
    malformed simply drops out of the stage)."""
    for name in targets:
        received[name] = received.get(name, 0) + sum(len(v) for v in params.values())
    out: dict[str, Any] = {}
    for res in channel._broadcast_stage(task, params, targets, request.round, plan.session.threshold):
        name = client_name(res)
        raw = (res.params or {}).get("update")
        if name not in targets or name in out or not isinstance(raw, (bytes, bytearray)):
            continue
        try:
            message = decode_message(bytes(raw), plan.session, kind, size)
        except ValueError as exc:
            channel.controller.warning(f"round {request.round}: {task}: {exc}"[:400])
            continue
        if message.site == name:
            out[name] = message
            sent[name] = sent.get(name, 0) + len(raw)
    return out
