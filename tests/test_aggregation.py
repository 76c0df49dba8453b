import pytest
import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.strategies import FedAvg, FedAvgM, weighted_delta
from monai_fedpriv.fl.update import ModelUpdate


def _glob():
    return {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([0.5]), "n": torch.tensor(7)}


def _upd(site, w, b, steps, samples, masks=None):
    return ModelUpdate(
        site, 1, {"w": torch.tensor(w), "b": torch.tensor(b), "n": torch.tensor(1)}, samples, steps, masks=masks
    )


def test_fedavg_weighted_by_steps_matches_hand_computation():
    g = _glob()
    u1 = _upd("a", [1.0, 0.0, -1.0], [2.0], steps=10, samples=5)
    u2 = _upd("b", [4.0, 3.0, 2.0], [-1.0], steps=30, samples=50)
    new = FedAvg("steps")(g, [u1, u2])
    # Li et al. Alg. 3: W + sum N_k dW_k / sum N_k with N = local steps 10, 30
    expected_w = (
        torch.tensor([1.0, 2.0, 3.0]) + (10 * torch.tensor([1.0, 0.0, -1.0]) + 30 * torch.tensor([4.0, 3.0, 2.0])) / 40
    )
    assert torch.allclose(new["w"], expected_w)
    assert torch.allclose(new["b"], torch.tensor([0.5 + (10 * 2.0 + 30 * -1.0) / 40]))
    assert new["n"].dtype == torch.int64 and int(new["n"]) == 8


def test_fedavg_samples_and_uniform_weighting():
    g = _glob()
    u1 = _upd("a", [1.0, 1.0, 1.0], [0.0], steps=1, samples=1)
    u2 = _upd("b", [4.0, 4.0, 4.0], [0.0], steps=1, samples=3)
    assert torch.allclose(FedAvg("samples")(g, [u1, u2])["w"], g["w"] + 3.25)
    assert torch.allclose(FedAvg("uniform")(g, [u1, u2])["w"], g["w"] + 2.5)


def test_sparse_updates_average_over_senders_only():
    g = _glob()
    m1 = {"w": torch.tensor([True, False, False]), "b": torch.tensor([False]), "n": torch.tensor(True)}
    m2 = {"w": torch.tensor([True, True, False]), "b": torch.tensor([False]), "n": torch.tensor(True)}
    u1 = _upd("a", [1.0, 99.0, 99.0], [99.0], steps=1, samples=1, masks=m1)
    u2 = _upd("b", [3.0, 5.0, 99.0], [99.0], steps=3, samples=1, masks=m2)
    new = FedAvg("steps")(g, [u1, u2])
    # coordinate 0: both (1*1 + 3*3)/4; coordinate 1: only b -> 5; coordinate 2 and b: nobody -> unchanged
    assert torch.allclose(new["w"], torch.tensor([1.0 + 2.5, 2.0 + 5.0, 3.0]))
    assert torch.allclose(new["b"], g["b"])


def test_bad_updates_raise_naming_site():
    g = _glob()
    bad = _upd("site-x", [float("nan"), 0.0, 0.0], [0.0], 1, 1)
    with pytest.raises(UpdateError, match="site-x.*'w'.*NaN"):
        FedAvg()(g, [bad])
    missing = ModelUpdate("site-y", 1, {"w": torch.zeros(3)}, 1, 1)
    with pytest.raises(UpdateError, match="site-y.*lacks"):
        FedAvg()(g, [missing])
    shape = _upd("site-z", [0.0, 0.0], [0.0], 1, 1)
    with pytest.raises(UpdateError, match="site-z.*shape"):
        FedAvg()(g, [shape])
    inf = _upd("site-i", [0.0, float("inf"), 0.0], [0.0], 1, 1)
    with pytest.raises(UpdateError, match="site-i"):
        FedAvg()(g, [inf])


def test_zero_work_and_bad_args_raise():
    g = _glob()
    with pytest.raises(ValueError, match="sum to zero"):
        FedAvg("steps")(g, [_upd("a", [0.0, 0, 0], [0.0], steps=0, samples=1)])
    with pytest.raises(ValueError, match="weighting"):
        FedAvg("median")
    with pytest.raises(ValueError, match="momentum"):
        FedAvgM(momentum=1.5)
    with pytest.raises(ValueError, match="empty"):
        weighted_delta(g, [])


def test_fedavgm_accumulates_velocity_and_restores_state():
    g = {"w": torch.zeros(2)}
    agg = FedAvgM(momentum=0.5)
    u = ModelUpdate("a", 1, {"w": torch.ones(2)}, 1, 1)
    g1 = agg(g, [u])
    g2 = agg(g1, [u])  # v = 0.5*1 + 1 = 1.5
    assert torch.allclose(g2["w"], torch.full((2,), 2.5))
    clone = FedAvgM(momentum=0.5)
    clone.load_state_dict(agg.state_dict())
    assert torch.allclose(clone(g2, [u])["w"], agg(g2, [u])["w"])
