"""The leakage gate of ``ReconstructionAttackEvaluator``: an attacked update that leaks is dropped, not sent."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from monai_fedpriv.attacks import ThreatModel
from monai_fedpriv.fl.strategies import weighted_delta
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.handlers.attack_evaluator import ReconstructionAttackEvaluator
from tests.test_attack_share import _label, _phantom


def test_leakage_gate_drops_a_leaking_update(tmp_path):
    torch.manual_seed(0)
    net = UNet(2, 1, 3, (4, 8, 16), (2, 2), norm="INSTANCE", num_res_units=1)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    core = torch.from_numpy(_label() == 2).long()  # a label much coarser than the textured image: a weak mask baseline
    batch = {"image": torch.from_numpy(_phantom())[None, None], "label": core[None, None]}
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)

    def step(engine, b):
        optimizer.zero_grad()
        loss(net(b["image"]), b["label"]).backward()
        optimizer.step()

    tm = ThreatModel((24, 24), 3, lr=0.1)
    with pytest.raises(ValueError, match="gate_ssim"):
        ReconstructionAttackEvaluator([1], tmp_path, tm, net, loss, gate_ssim=1.5)
    gate = ReconstructionAttackEvaluator([1], tmp_path, tm, net, loss, iterations=120, restarts=1, num_threads=1,
                                         gate_ssim=0.3)  # fmt: skip
    trainer = Engine(step)
    gate.attach(trainer)
    start = {n: p.detach().clone() for n, p in net.named_parameters()}
    trainer.run([batch], max_epochs=1)
    delta = {n: p.detach() - start[n] for n, p in net.named_parameters()}
    update = ModelUpdate("site-1", 1, delta, n_samples=1, local_steps=1)
    sent = gate(update)
    record = gate.results[1]
    assert record["images"][0]["verdict"].startswith("leaks") and record["ssim"] >= 0.3
    assert sent is not update and record["dropped"] is True and sent.meta["privacy"]["leakage_gate"]["dropped"]
    assert not any(bool(m.any()) for m in sent.masks.values())
    other = ModelUpdate("site-2", 1, {k: torch.ones_like(v) for k, v in delta.items()}, 1, 1)
    merged = weighted_delta(start, [sent, other])  # the dropped update contributes nothing
    assert all(torch.allclose(v, torch.ones_like(v)) for v in merged.values())
    ungated = ReconstructionAttackEvaluator([2], tmp_path, tm, net, loss, gate_ssim=0.3)
    passed = ungated(update)  # rounds it does not attack pass unchanged (a copy, as every filter returns)
    assert passed is not update and all(torch.equal(passed.delta[k], v) for k, v in update.delta.items())
