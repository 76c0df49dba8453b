"""FedAvg+Share (Zhao et al. 2018; seed 004): the shared pool, and DP-SGD accounting that leaves it out."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader

from monai_fedpriv.data.share_pool import PUBLIC_KEY, draw_share_pool, is_public, site_data_with_pool
from monai_fedpriv.errors import DataError, PrivacyConfigError
from monai_fedpriv.privacy.accounting import PrivacyLedger
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.dp_sgd import DPSGD
from tests.test_dp_sgd import private
from tests.test_patient_dp import _items, _Listed


def _sites(sizes=(20, 40, 7), per_patient=1):
    return {
        f"site-{k}": [{"image": f"s{k}_{i}.nii", **({"patient": f"s{k}p{i // per_patient}"} if per_patient else {})}
                      for i in range(n)]
        for k, n in enumerate(sizes, 1)
    }  # fmt: skip


def test_pool_size_per_site_and_reproducible_from_the_seed():
    train = _sites()
    out = draw_share_pool(train, 0.05, seed=7)
    by_site = {s: [c for c in out.pool if c["image"].startswith(s.replace("site-", "s") + "_")] for s in train}
    assert {s: len(v) for s, v in by_site.items()} == {"site-1": 1, "site-2": 2, "site-3": 1}  # max(1, round(f n))
    assert {s: len(v) for s, v in out.private.items()} == {"site-1": 19, "site-2": 38, "site-3": 6}
    assert [c["image"][:2] for c in out.pool] == ["s1", "s2", "s2", "s3"]  # by site, then original position
    assert all(c[PUBLIC_KEY] is True for c in out.pool)
    assert draw_share_pool(train, 0.05, seed=7) == out
    assert draw_share_pool(dict(reversed(train.items())), 0.05, seed=7).pool == out.pool  # not the dict order
    assert draw_share_pool(_sites(sizes=(200,)), 0.05, seed=8).pool != draw_share_pool(_sites((200,)), 0.05, 9).pool
    assert all(PUBLIC_KEY not in c for cases in train.values() for c in cases)  # the input is left unchanged


def test_private_and_pool_are_disjoint_and_their_union_is_the_input():
    train = _sites(sizes=(30, 50), per_patient=0)  # no patient key: every case is its own unit
    out = draw_share_pool(train, 0.1, seed=1)
    for site, cases in train.items():
        pooled = [{k: v for k, v in c.items() if k != PUBLIC_KEY} for c in out.pool if c["image"] in
                  {x["image"] for x in cases}]  # fmt: skip
        assert len(pooled) == round(0.1 * len(cases))
        assert not {c["image"] for c in pooled} & {c["image"] for c in out.private[site]}
        assert sorted(c["image"] for c in pooled + out.private[site]) == sorted(c["image"] for c in cases)
        assert out.private[site] == [c for c in cases if c not in pooled]  # original order kept


def test_whole_patients_go_to_the_pool():
    train = _sites(sizes=(60, 90), per_patient=3)  # 20 and 30 patients of 3 cases
    out = draw_share_pool(train, 0.1, seed=2)
    public = {c["patient"] for c in out.pool}
    assert len(public) == 2 + 3 and len(out.pool) == 3 * 5
    for site, cases in out.private.items():
        assert not public & {c["patient"] for c in cases}
        assert len(cases) == len(train[site]) - 3 * sum(p.startswith(site.replace("site-", "s")) for p in public)


@pytest.mark.parametrize("fraction", [0, -0.1, 0.51, 1.0, float("nan"), True, "0.05"])
def test_a_bad_fraction_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction"):
        draw_share_pool(_sites(), fraction, seed=0)


def test_a_site_left_without_private_data_or_a_shared_patient_is_refused():
    with pytest.raises(DataError, match="site-2"):
        draw_share_pool({"site-1": [{"image": "a"}, {"image": "b"}], "site-2": [{"image": "c"}]}, 0.05, seed=0)
    with pytest.raises(DataError, match="site-1"):  # 2 patients of 2 cases: 1 goes, 1 stays; 1 patient: none stays
        draw_share_pool({"site-1": [{"patient": "p", "image": "a"}, {"patient": "p", "image": "b"}]}, 0.5, seed=0)
    split = {"site-1": [{"patient": "p1"}, {"patient": "p2"}], "site-2": [{"patient": "p3"}, {"patient": "p1"}]}
    with pytest.raises(DataError, match="p1"):
        draw_share_pool(split, 0.05, seed=0)
    with pytest.raises(DataError, match="public"):
        draw_share_pool({"site-1": [{"image": "a", "public": True}, {"image": "b"}]}, 0.05, seed=0)


def test_site_data_is_private_cases_then_the_pool_all_marked():
    out = draw_share_pool(_sites(sizes=(20, 20)), 0.05, seed=0)
    data = site_data_with_pool(out.private["site-1"], out.pool)
    assert len(data) == 19 + 2
    assert [is_public(c) for c in data] == [False] * 19 + [True] * 2
    assert [c["image"] for c in data] == [c["image"] for c in out.private["site-1"] + out.pool]
    assert PUBLIC_KEY not in out.private["site-1"][0]  # copies: the SharePool is left unchanged
    with pytest.raises(DataError):
        site_data_with_pool(out.pool, out.pool)
    with pytest.raises(DataError):
        site_data_with_pool(out.private["site-1"], out.private["site-2"])
    with pytest.raises(DataError, match="bool"):
        is_public({"public": "false"})  # never a private case taken for public by a typo
    assert not is_public({"image": "a"}) and not is_public("a")


# ------------------------------------------------------------------------------------------------ DP-SGD
def _dicts(n_private, n_public, size=4):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(size, generator=g), "name": f"{'pub' if i >= n_private else 'priv'}{i}",
             PUBLIC_KEY: i >= n_private} for i in range(n_private + n_public)]  # fmt: skip


def _train(parts, epochs):
    names, steps = [], 0
    for _ in range(epochs):
        for batch in parts.data_loader:
            names.append(list(batch["name"]))
            parts.optimizer.zero_grad()
            parts.network(batch["image"]).pow(2).sum().backward()
            parts.optimizer.step()
            steps += 1
    return names, steps + parts.data_loader.empty_steps


def test_private_sample_rate_and_epsilon_leave_the_public_items_out():
    n, p, b, sigma = 12, 6, 3, 1.1
    model = nn.Linear(4, 2)
    ledger = PrivacyLedger()
    parts = private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_dicts(n, p), batch_size=b),
                    noise_multiplier=sigma, max_grad_norm=1.0, ledger=ledger)  # fmt: skip
    q = b / n  # never b / (n + p)
    assert parts.optimizer.sample_rate == q != b / (n + p)
    assert parts.data_loader.sample_rate == q and parts.data_loader.public_units == p
    assert parts.optimizer.expected_batch_size == round((n + p) * q)  # the mean is over private and public items
    names, steps = _train(parts, epochs=25)
    assert steps == ledger.steps == 25 * 4  # int(1 / q) steps a pass, as without public items
    assert {e["sample_rate"] for e in ledger.events} == {q}
    ref = RDPAccountant()  # independent: Opacus' accountant at q = b / N_private
    ref.history = [(sigma, q, steps)]
    assert ledger.epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    wrong = RDPAccountant()
    wrong.history = [(sigma, b / (n + p), steps)]
    assert ledger.epsilon(1e-5) > wrong.get_epsilon(1e-5)  # counting the pool would under-report epsilon
    drawn = [x for batch in names for x in batch]
    public_seen = sum(x.startswith("pub") for x in drawn)
    assert public_seen > 0
    for count, units in ((public_seen, p), (len(drawn) - public_seen, n)):  # each unit joins a step w.p. q
        expected = q * units * steps
        assert abs(count - expected) < 4 * math.sqrt(expected)


def test_public_draws_do_not_depend_on_the_private_data():
    def public_names(n_private, batch_size):
        model = nn.Linear(4, 2)
        items = _dicts(12, 6)[12 - n_private :]  # other private items (fewer, other images); the same pool
        parts = private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(items, batch_size=batch_size),
                        noise_multiplier=1.0, max_grad_norm=1.0, ledger=PrivacyLedger(), seed=4)  # fmt: skip
        sampler = parts.data_loader.batch_sampler
        return [[items[i]["name"] for i in batch if i in sampler.public_index] for _ in range(5) for batch in sampler]

    # the same rate q = 3/12 = 2/8 over other private data: the same public items, step by step
    assert public_names(12, batch_size=3) == public_names(8, batch_size=2)


def test_without_public_items_the_draws_are_unchanged():
    def draws(items):
        model = nn.Linear(4, 2)
        parts = private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(items, batch_size=2),
                        noise_multiplier=1.0, max_grad_norm=1.0, ledger=PrivacyLedger())  # fmt: skip
        return [list(b["name"]) for _ in range(3) for b in parts.data_loader], parts.optimizer.sample_rate

    flagged = _dicts(10, 0)
    plain = [{k: v for k, v in c.items() if k != PUBLIC_KEY} for c in flagged]
    assert draws(flagged) == draws(plain)


def test_patient_unit_samples_private_patients_only_and_resumes_public_draws():
    patients = [f"p{i // 3}" for i in range(12)] + ["pub0"] * 3 + ["pub1"] * 3  # 4 private + 2 public patients
    items = [{**c, PUBLIC_KEY: c["patient"].startswith("pub")} for c in _items(patients)]

    def build():
        net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
        loader = DataLoader(_Listed(items), batch_size=2)
        return DPSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), loader, 1.0, 1.0, budget=PrivacyBudget(),
                     seed=0, privacy_unit="patient", items_per_patient=None)  # fmt: skip

    dp = build()
    assert dp.sample_rate == 2 / 4  # expected private patients per step / private patients
    facts = dp.privacy_facts()
    assert facts["sample_rate"] == 0.5 and facts["public_units"] == 2
    seen = [b["patient"] for _ in range(10) for b in dp.dataloader]
    assert any(p.startswith("pub") for batch in seen for p in batch)
    state = dp.state_dict()
    assert "public_generator" in state
    after = [b["patient"] for _ in range(3) for b in dp.dataloader]
    resumed = build()
    resumed.load_state_dict(state)
    assert [b["patient"] for _ in range(3) for b in resumed.dataloader] == after


def test_a_patient_both_public_and_private_or_no_private_data_is_refused():
    model = nn.Linear(4, 2)
    mixed = [{"image": torch.rand(4), "patient": "a", PUBLIC_KEY: i == 0} for i in range(3)]
    mixed.append({"image": torch.rand(4), "patient": "b", PUBLIC_KEY: False})
    with pytest.raises(PrivacyConfigError, match="both public and private"):
        private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_Listed(mixed), batch_size=1),
                noise_multiplier=1.0, max_grad_norm=1.0, privacy_unit="patient")  # fmt: skip
    with pytest.raises(PrivacyConfigError, match="every training item is marked public"):
        private(model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(_dicts(0, 4), batch_size=1),
                noise_multiplier=1.0, max_grad_norm=1.0)  # fmt: skip
