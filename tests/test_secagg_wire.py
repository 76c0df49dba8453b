"""The secure-aggregation stages' messages as bytes: a round trip through the wire gives the same sum, and hostile
bytes (truncated, inflated, of another kind, session or round, outside the ring or the field) are one ValueError."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from monai_fedpriv.secagg import Session
from monai_fedpriv.secagg.client import SecAggClient
from monai_fedpriv.secagg.messages import from_ring, to_ring
from monai_fedpriv.secagg.server import SecAggServer
from monai_fedpriv.secagg.wire import decode_message, encode_message

SITES = ("site-1", "site-2", "site-3", "site-4")


def _session(rnd: int = 1) -> Session:
    return Session(secrets.token_hex(8), rnd, SITES, 3, 16)


def _wire(message, s: Session, kind: str, size: int | None = None):  # noqa: ANN001, ANN202
    return decode_message(encode_message(message, s.bits), s, kind, size)


def test_every_stage_through_the_wire_gives_the_plain_sum_and_16_bit_vectors_take_2_bytes():
    s = _session()
    rng = np.random.default_rng(0)
    xs = {v: rng.integers(-500, 500, size=300) for v in SITES}
    clients = {v: SecAggClient(v, s) for v in SITES}
    server = SecAggServer(s, 300)
    adverts = [_wire(c.advertise(), s, "advert") for c in clients.values()]
    public = server.collect_adverts(adverts)
    shares = [_wire(clients[v].share_keys(public), s, "shares") for v in SITES]
    routed = server.route(shares)
    masked_bytes = [encode_message(clients[v].masked_input(routed[v], to_ring(xs[v], 16)), 16) for v in SITES[:3]]
    assert all(len(b) < 2 * 300 + 200 for b in masked_bytes)
    request = _wire(server.collect_inputs([decode_message(b, s, "masked", 300) for b in masked_bytes]), s, "request")
    answers = [_wire(clients[v].unmask(request), s, "unmask") for v in request.survivors]
    total = server.unmask(answers)
    assert np.array_equal(from_ring(total, 16), sum(xs[v] for v in SITES[:3]))


def test_hostile_bytes_are_one_value_error_naming_the_sender():
    s = _session()
    client = SecAggClient("site-2", s)
    good = encode_message(client.advertise(), s.bits)
    other = _session(rnd=2)
    with pytest.raises(ValueError, match="site-2: .*replayed, stale or misrouted"):
        decode_message(good, other, "advert")
    with pytest.raises(ValueError, match="not a shares message"):
        decode_message(good, s, "shares")
    with pytest.raises(ValueError, match="too short|header length"):
        decode_message(good[:9], s, "advert")
    inflated = good[:5] + (2**31).to_bytes(4, "little") + good[9:]
    with pytest.raises(ValueError, match="header length"):
        decode_message(inflated, s, "advert")
    from monai_fedpriv.secagg.messages import MaskedInput, UnmaskShares

    beyond = MaskedInput("site-2", s.session_id, 1, np.full(5, 70000, dtype=np.uint64))
    with pytest.raises(ValueError, match="2 byte|outside the ring"):  # packed to 2 bytes it is another value: size
        decode_message(encode_message(beyond, 32), s, "masked", 5)
    with pytest.raises(ValueError, match="not 6 integers"):
        decode_message(encode_message(MaskedInput("site-2", s.session_id, 1, np.zeros(5, np.uint64)), 16), s,
                       "masked", 6)  # fmt: skip
    huge = UnmaskShares("site-2", s.session_id, 1, {"site-1": 2**521}, {})
    with pytest.raises(ValueError, match="outside the field"):
        decode_message(encode_message(huge, 16), s, "unmask")
    stranger = UnmaskShares("site-9", s.session_id, 1, {}, {})
    with pytest.raises(ValueError, match="not a site of the round"):
        decode_message(encode_message(stranger, 16), s, "unmask")


def test_random_mutations_never_raise_anything_but_value_error():
    s = _session()
    clients = {v: SecAggClient(v, s) for v in SITES}
    public = {v: c.advertise() for v, c in clients.items()}
    samples = [(encode_message(clients["site-1"].share_keys(public), 16), "shares"),
               (encode_message(public["site-3"], 16), "advert")]  # fmt: skip
    rng = np.random.default_rng(1)
    for _ in range(1500):
        data, kind = samples[int(rng.integers(len(samples)))]
        mutated = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            if not mutated:
                break
            if rng.random() < 0.2 and len(mutated) > 10:
                del mutated[int(rng.integers(len(mutated))) :]
            else:
                mutated[int(rng.integers(len(mutated)))] = int(rng.integers(256))
        try:
            decode_message(bytes(mutated), s, kind)
        except ValueError:
            pass
