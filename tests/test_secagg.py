"""Secure aggregation (Bonawitz et al. 2017; SecAgg+ neighbours of Bell et al. 2020): the unmasked sum is the plain
sum, the server holds no site's input and never both shares of one site, dropouts before and after sending are
survived while the threshold holds and fail cleanly when it does not, replayed or stale messages are refused."""

from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import pytest

from monai_fedpriv.secagg import SecAggError, Session, default_threshold, secure_sum, shamir
from monai_fedpriv.secagg.client import SecAggClient
from monai_fedpriv.secagg.messages import MaskedInput, SharePackets, UnmaskShares, from_ring, to_ring
from monai_fedpriv.secagg.server import SecAggServer


def sites(n: int) -> tuple[str, ...]:
    return tuple(f"site-{i}" for i in range(1, n + 1))


def session(n: int, rnd: int = 1, threshold: int | None = None, bits: int = 16, neighbours: int | None = None,
            session_id: str | None = None) -> Session:  # fmt: skip
    names = sites(n)
    return Session(session_id or secrets.token_hex(8), rnd, names, threshold or default_threshold(n, neighbours),
                   bits, neighbours, graph_seed=7)  # fmt: skip


def inputs(s: Session, size: int = 500, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {site: rng.integers(-(2**10), 2**10, size=size) for site in s.sites}


def ring(values: dict[str, np.ndarray], bits: int) -> dict[str, np.ndarray]:
    return {k: to_ring(v, bits) for k, v in values.items()}


@pytest.mark.parametrize("n,neighbours", [(3, None), (5, None), (10, 4), (12, 6)])
def test_the_unmasked_sum_is_the_plain_sum(n, neighbours):
    s = session(n, neighbours=neighbours)
    xs = inputs(s)
    out = secure_sum(s, ring(xs, s.bits))
    assert np.array_equal(from_ring(out.total, s.bits), sum(xs.values()))
    assert out.survivors == s.sites and out.dropped == ()


@pytest.mark.parametrize("neighbours", [None, 4])
def test_a_site_dropping_after_its_input_and_one_before_still_give_the_survivors_sum(neighbours):
    s = session(8, neighbours=neighbours, threshold=3)
    xs = inputs(s, seed=1)
    out = secure_sum(s, ring(xs, s.bits), drop_before_send={"site-2"}, drop_after_send={"site-5"})
    assert out.dropped == ("site-2",) and "site-5" in out.survivors  # its input counts: it was sent
    assert np.array_equal(from_ring(out.total, s.bits), sum(v for k, v in xs.items() if k != "site-2"))
    assert out.bytes_sent["site-2"] < out.bytes_sent["site-1"]  # it sent keys and shares only


def test_the_server_holds_no_sites_input_and_never_both_shares_of_one_site():
    s = session(6, threshold=3)
    xs = inputs(s, size=4000, seed=2)
    out = secure_sum(s, ring(xs, s.bits), drop_before_send={"site-3"}, drop_after_send={"site-6"})
    server = out.server
    assert server is not None
    masked = [m for m in server.received if isinstance(m, MaskedInput)]
    assert len(masked) == 5
    for m in masked:  # every input the server holds is masked: uniform on the ring, unrelated to the site's vector
        plain = to_ring(xs[m.site], s.bits).astype(np.float64)
        values = m.values.astype(np.float64)
        assert abs(values.mean() / 2**s.bits - 0.5) < 0.02
        assert abs(np.corrcoef(values, plain)[0, 1]) < 0.06
    keys = {v for m in server.received if isinstance(m, UnmaskShares) for v in m.keys}
    seeds = {v for m in server.received if isinstance(m, UnmaskShares) for v in m.self_mask}
    assert keys == {"site-3"} and "site-3" not in seeds and not keys & seeds
    secret_shares = {str(y) for m in server.received if isinstance(m, UnmaskShares) for y in m.keys.values()}
    for packets in (m.packets for m in server.received if isinstance(m, SharePackets)):
        assert all(str(y).encode() not in p for p in packets.values() for y in secret_shares)  # sealed, unreadable


def test_too_few_survivors_or_answers_fail_the_sum_cleanly():
    s = session(5, threshold=3)
    xs = ring(inputs(s), s.bits)
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):
        secure_sum(s, xs, drop_before_send={"site-1", "site-2", "site-3"})
    with pytest.raises(SecAggError, match="unmasking stage"):
        secure_sum(s, xs, drop_after_send={"site-1", "site-2", "site-3"})


def test_two_survivors_or_survivors_in_separate_groups_are_never_unmasked():
    s = session(3, threshold=2)
    with pytest.raises(SecAggError, match="fewer than the threshold 3"):  # each of two would learn the other's input
        secure_sum(s, ring(inputs(s), s.bits), drop_before_send={"site-2"})
    s = session(6, threshold=2, neighbours=2)  # a ring: each site pairs with the two next to it
    a = s.sites[0]
    gap = {a, next(v for v in s.sites if v != a and v not in s.graph[a])}  # two sites apart cut the ring in two
    assert not s.connected(tuple(v for v in s.sites if v not in gap))
    with pytest.raises(SecAggError, match="connected group"):  # the server could unmask each group's sum
        secure_sum(s, ring(inputs(s), s.bits), drop_before_send=gap)


def _through_stage_two(s: Session, xs: dict[str, np.ndarray]):
    clients = {site: SecAggClient(site, s) for site in s.sites}
    server = SecAggServer(s, len(next(iter(xs.values()))))
    public = server.collect_adverts([c.advertise() for c in clients.values()])
    routed = server.route([c.share_keys(public) for c in clients.values()])
    return clients, server, routed


def test_replayed_stale_or_inconsistent_messages_are_refused():
    s1 = session(4, rnd=1, threshold=3)
    xs = ring(inputs(s1, size=50), s1.bits)
    clients, server, routed = _through_stage_two(s1, xs)
    first = clients["site-1"].masked_input(routed["site-1"], xs["site-1"])
    with pytest.raises(ValueError, match="second MaskedInput"):
        server.collect_inputs([first, first])
    with pytest.raises(ValueError, match="stage 2 asked while at stage 3"):
        clients["site-1"].masked_input(routed["site-1"], xs["site-1"])
    # the next round: a new session; round 1's messages and share packets are refused
    s2 = dataclasses.replace(s1, round=2)
    clients2, server2, routed2 = _through_stage_two(s2, xs)
    with pytest.raises(ValueError, match="round 1, not of this round's \\(2\\): replayed or stale"):
        server2.collect_inputs([first])
    with pytest.raises(ValueError, match="failed authentication"):
        clients2["site-2"].masked_input(routed["site-2"], xs["site-2"])  # round 1's packets
    # a server asking for both shares of one site, or unmasking fewer than the threshold, is refused by the sites
    s3 = session(4, threshold=3)
    clients3, server3, routed3 = _through_stage_two(s3, xs)
    sent = [clients3[v].masked_input(routed3[v], xs[v]) for v in s3.sites]
    request = server3.collect_inputs(sent)
    both = dataclasses.replace(request, dropped=("site-2",))
    with pytest.raises(ValueError, match="both as survivor and as dropped"):
        clients3["site-1"].unmask(both)
    few = dataclasses.replace(request, survivors=("site-1", "site-2"), dropped=("site-3", "site-4"))
    with pytest.raises(ValueError, match="at least 3, in one connected group"):
        clients3["site-3"].unmask(dataclasses.replace(few, survivors=("site-3", "site-4"), dropped=()))


def test_sessions_refuse_two_sites_and_thresholds_out_of_range():
    with pytest.raises(ValueError, match="with two, each site learns the other's update"):
        Session("s", 1, sites(2), 2, 16)
    with pytest.raises(ValueError, match="--secagg-threshold 6 must be in"):
        Session("s", 1, sites(5), 6, 16)
    with pytest.raises(ValueError, match="exceeds what"):
        Session("s", 1, sites(10), 6, 16, neighbours=2)
    assert default_threshold(3) == 2 and default_threshold(10) == 6 and default_threshold(10, 4) == 3


def test_shamir_any_threshold_shares_recover_the_secret_and_fewer_do_not():
    secret = secrets.randbits(256)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], 3)
    for chosen in ([1, 2, 3], [2, 4, 5], [5, 1, 3]):
        assert shamir.combine([(x, shares[x]) for x in chosen]) == secret
    assert shamir.combine([(x, shares[x]) for x in (1, 2)]) != secret
    with pytest.raises(ValueError):
        shamir.split(secret, [1, 1, 2], 2)
