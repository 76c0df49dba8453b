"""One secure sum run in-process, stage by stage, with sites that drop before or after sending their input: what the
simulator's channel does in a round, and what the tests and the benchmark drive.
"""

from __future__ import annotations

from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

import numpy as np

from monai_fedpriv.secagg.client import SecAggClient
from monai_fedpriv.secagg.messages import wire_bytes
from monai_fedpriv.secagg.server import SecAggError, SecAggServer
from monai_fedpriv.secagg.session import Session

__all__ = ["SecureSum", "secure_sum"]


@dataclass
class SecureSum:
    """The unmasked sum (mod ``2^bits``), who survived and who dropped, and the bytes each site sent and received
    over the four stages."""

    total: np.ndarray
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    bytes_sent: dict[str, int] = field(default_factory=dict)
    bytes_received: dict[str, int] = field(default_factory=dict)
    server: SecAggServer | None = None


def secure_sum(session: Session, inputs: Mapping[str, np.ndarray], drop_before_send: AbstractSet[str] = frozenset(),
               drop_after_send: AbstractSet[str] = frozenset()) -> SecureSum:  # fmt: skip
    """Run the four stages over ``inputs`` (``{site: integers mod 2^bits}``); sites in ``drop_before_send`` share
    their keys and then send nothing more, sites in ``drop_after_send`` send their masked input and then vanish.

    Raises:
        SecAggError: a stage had fewer than ``threshold`` participants (nothing aggregated).
    """
    if not inputs:
        raise SecAggError(f"round {session.round}: no site has an input for the secure sum; nothing was aggregated.")
    size = len(next(iter(inputs.values())))
    clients = {site: SecAggClient(site, session) for site in session.sites if site in inputs}
    server = SecAggServer(session, size)
    sent = {site: 0 for site in clients}
    got = {site: 0 for site in clients}

    def count(site: str, message: object, into: dict[str, int]) -> None:
        into[site] += wire_bytes(message, session.bits)  # type: ignore[arg-type]

    adverts = [c.advertise() for c in clients.values()]
    for a in adverts:
        count(a.site, a, sent)
    public = server.collect_adverts(adverts)
    for site in clients:
        got[site] += sum(wire_bytes(a, session.bits) for a in public.values())
    shared = []
    for site in public:
        try:  # a site that cannot share (too few neighbours advertised) drops out here
            shared.append(clients[site].share_keys(public))
        except ValueError:
            continue
    for m in shared:
        count(m.site, m, sent)
    routed = server.route(shared)
    for site, packets in routed.items():
        got[site] += sum(len(p) + 16 for p in packets.values())
    inputs_sent = []
    for site, packets in routed.items():
        if site in drop_before_send:
            continue
        try:
            message = clients[site].masked_input(packets, inputs[site])
        except ValueError:  # an unusable packet: the site sends no input
            continue
        count(site, message, sent)
        inputs_sent.append(message)
    request = server.collect_inputs(inputs_sent)
    answers = []
    for site in request.survivors:
        got[site] += wire_bytes(request, session.bits)
        if site in drop_after_send:
            continue
        try:
            answer = clients[site].unmask(request)
        except ValueError:  # a request the site refuses: it answers nothing
            continue
        count(site, answer, sent)
        answers.append(answer)
    total = server.unmask(answers)
    return SecureSum(total, request.survivors, request.dropped, sent, got, server)
