"""Patient-level DP-SGD (issue 9, item 4): patients are Poisson-sampled, each sampled patient's items are clipped
together, and epsilon is accounted with the patient sample rate."""

from __future__ import annotations

import json

import pytest
import torch
from monai.engines import SupervisedTrainer
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader

from monai_fedpriv.errors import DataError, PrivacyConfigError
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.dp_sgd import DPSGD, PatientPoissonSampler, unit_clip_weights
from monai_fedpriv.privacy.losses import PerSampleLoss


def _clipped_sum(samples, clip, groups):
    w = unit_clip_weights(samples, clip, groups)
    return torch.cat([(w @ s.reshape(len(w), -1)) for s in samples])


def test_one_patient_with_many_slices_moves_the_clipped_sum_by_at_most_the_clip_norm():
    g = torch.Generator().manual_seed(0)
    clip = 0.5
    many = 12  # patient "p0" contributes 12 slices, each with a large gradient in the same direction
    direction = torch.randn(1, 30, generator=g)
    big = direction.repeat(many, 1) * 10
    others = torch.randn(5, 30, generator=g) * 10
    with_p0 = [torch.cat([big, others])]
    without = [others]
    groups = ["p0"] * many + [f"p{i}" for i in range(1, 6)]
    diff = _clipped_sum(with_p0, clip, groups) - _clipped_sum(without, clip, groups[many:])
    assert float(diff.norm()) <= clip * (1 + 1e-5)
    # per-slice clipping (the slice unit) lets the same patient move it by up to 12 C: the unit matters
    slice_diff = _clipped_sum(with_p0, clip, None) - _clipped_sum(without, clip, None)
    assert float(slice_diff.norm()) > 10 * clip


def test_patient_gradient_is_the_mean_of_its_items_clipped_as_a_whole():
    samples = [torch.tensor([[3.0, 0.0], [1.0, 0.0], [0.0, 0.1]])]
    w = unit_clip_weights(samples, 1.0, ["a", "a", "b"])
    # patient a: mean gradient (2, 0), norm 2 -> factor 0.5, per item 0.25; patient b: norm 0.1 -> kept
    assert w.tolist() == pytest.approx([0.25, 0.25, 1.0], rel=1e-5)
    with pytest.raises(PrivacyConfigError, match="patient ids"):
        unit_clip_weights(samples, 1.0, ["a", "b"])


def test_patient_poisson_sampler_samples_patients_not_items():
    patients = ["a"] * 10 + ["b"] * 2 + ["c", "d"]
    sampler = PatientPoissonSampler(patients, 0.5, torch.Generator().manual_seed(0), items_per_patient=None, steps=400)
    assert len(sampler) == 400
    included = {p: 0 for p in "abcd"}
    for batch in sampler:
        present = {patients[i] for i in batch}
        for p in present:
            included[p] += 1
            assert sum(patients[i] == p for i in batch) == patients.count(p)  # all of its items, no more
    for p, n in included.items():  # each patient w.p. 0.5, whatever its number of items
        assert abs(n / 400 - 0.5) < 0.1, (p, n)
    one = PatientPoissonSampler(patients, 1.0, torch.Generator().manual_seed(1), items_per_patient=1, steps=20)
    for batch in one:
        assert sorted(patients[i] for i in batch) == ["a", "b", "c", "d"]  # q = 1, one item each
    again = PatientPoissonSampler(patients, 0.5, torch.Generator().manual_seed(0), items_per_patient=None, steps=400)
    assert list(again) == list(PatientPoissonSampler(patients, 0.5, torch.Generator().manual_seed(0), None, 400))


def _items(patients, size=8):
    g = torch.Generator().manual_seed(0)
    return [
        {"image": torch.rand(1, size, size, generator=g), "label": torch.randint(0, 2, (1, size, size), generator=g),
         "patient": p}
        for p in patients
    ]  # fmt: skip


class _Listed(torch.utils.data.Dataset):
    """A dataset with a ``data`` list, as MONAI's are."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i]


def _dp(patients, budget, batch_size=2, **kw):
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    loader = DataLoader(_Listed(_items(patients)), batch_size=batch_size)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    return DPSGD(net, opt, loader, 1.0, 1.0, budget=budget, seed=0, privacy_unit="patient", **kw)


def test_epsilon_is_accounted_with_the_patient_sample_rate_in_a_trainer():
    patients = [f"p{i // 5}" for i in range(20)]  # 4 patients, 5 slices each
    budget = PrivacyBudget(limit=1e6)
    dp = _dp(patients, budget, items_per_patient=None)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=dp.dataloader, network=dp.network,
        optimizer=dp.optimizer, loss_function=PerSampleLoss("dicece"),
    )  # fmt: skip
    dp.attach(trainer)
    trainer.run()
    assert dp.sample_rate == pytest.approx(2 / 4)  # expected patients per step / patients, not 2 / 20 slices
    events = budget.ledger.events
    assert {e["sample_rate"] for e in events} == {0.5}
    acc = RDPAccountant()
    acc.history = [(1.0, 0.5, budget.ledger.steps)]
    assert budget.epsilon() == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    facts = dp.privacy_facts()
    assert facts["privacy_unit"] == "patient" and "per patient" in facts["unit_note"]


def test_patient_unit_refuses_what_it_cannot_protect():
    with pytest.raises(PrivacyConfigError, match="patient"):
        net = nn.Conv2d(1, 2, 1)
        items = [{"image": torch.rand(1, 4, 4), "label": torch.zeros(1, 4, 4)} for _ in range(4)]  # no patient ids
        dp = DPSGD(net, torch.optim.SGD(net.parameters(), lr=0.1), DataLoader(_Listed(items), batch_size=2), 1.0,
                   1.0, budget=PrivacyBudget(), privacy_unit="patient")  # fmt: skip
        assert dp.optimizer is None  # building it raises
    dp = _dp(["a", "a", "b", "b"], PrivacyBudget())
    opt = dp.optimizer
    dp.network(torch.rand(2, 1, 8, 8)).sum().backward()
    with pytest.raises(PrivacyConfigError, match="no patient ids"):  # never silently clipped per item
        opt.step()

    class _Engine:
        class state:  # noqa: N801
            batch = {"image": torch.zeros(2)}

    with pytest.raises(DataError, match="patient"):
        dp._set_groups(_Engine())


def test_a_patient_split_across_two_sites_is_refused(tiny_data, tmp_path):
    from monai_fedpriv.bundle.loader import BundleSpec
    from monai_fedpriv.experiments import bundle_datalist, split_sites
    from monai_fedpriv.fl.simulator import FederatedSimulator, LocalWork
    from tests.conftest import BUNDLE_DIR, tiny_overrides

    overrides = {**tiny_overrides(tiny_data), "dp_privacy_unit": "patient", "dp_regime": "low"}
    bundle = BundleSpec(BUNDLE_DIR, ("train.json", "budget.json", "dp.json"), overrides)
    split = split_sites(bundle_datalist(bundle), 2, "institution", seed=0)
    shared = dict(split.train["site-1"][0])
    sites = {"site-1": split.train["site-1"], "site-2": [*split.train["site-2"], shared]}
    sim = FederatedSimulator(bundle, sites, split.val, 1, LocalWork(epochs=1), tmp_path, progress=False)
    with pytest.raises(PrivacyConfigError, match="split across sites"):
        sim.run()
    ok = FederatedSimulator(bundle, split.train, split.val, 1, LocalWork(epochs=1), tmp_path / "ok", progress=False)
    m = ok.run()
    priv = m["rounds"][0]["sites"]["site-1"]["privacy"]
    assert priv["privacy_unit"] == "patient" and "per patient" in priv["unit_note"]
    assert json.loads((tmp_path / "ok" / "metrics.json").read_text())["setup"]["site-1"]["dp_privacy_unit"] == "patient"


@pytest.mark.parametrize("command", ["simulate", "export-nvflare"])
def test_a_split_patient_is_refused_before_any_run_or_job_is_written(tiny_data, tmp_path, monkeypatch, capsys, command):
    import monai_fedpriv.experiments as experiments
    from monai_fedpriv.cli import main
    from tests.conftest import BUNDLE_DIR, tiny_overrides

    real = experiments.split_sites

    def split_one_patient(*args, **kwargs):  # site-2 also holds one of site-1's patients
        split = real(*args, **kwargs)
        split.train["site-2"] = [*split.train["site-2"], dict(split.train["site-1"][0])]
        return split

    monkeypatch.setattr(experiments, "split_sites", split_one_patient)
    overrides = [f"--override={k}={json.dumps(v)}" for k, v in tiny_overrides(tiny_data).items()]
    argv = [command, str(BUNDLE_DIR), "--sites", "2", "--rounds", "1", "--privacy", "medium", "--privacy-unit",
            "patient", "--output", str(tmp_path / "out"), *overrides]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "split across sites" in err[0], err
    assert not (tmp_path / "out").exists()

