"""The evaluator sees the batch a MONAI trainer trained on, also after MONAI decollated it into a list of dicts."""

import types

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import UNet

from monai_fedpriv.attacks import ThreatModel
from monai_fedpriv.handlers import ReconstructionAttackEvaluator


def _evaluator(tmp_path):
    net = UNet(2, 1, 3, (4, 8), (2,), norm="INSTANCE")
    tm = ThreatModel(image_shape=(8, 8), num_classes=3)
    return ReconstructionAttackEvaluator(
        [1], tmp_path, tm, net, DiceCELoss(to_onehot_y=True, softmax=True), iterations=1, restarts=1
    )


def test_decollated_batch_is_restacked(tmp_path):
    ev = _evaluator(tmp_path)
    items = [{"image": torch.full((1, 8, 8), float(i)), "label": torch.zeros(1, 8, 8), "pred": 0} for i in range(3)]
    ev.observe_batch(types.SimpleNamespace(state=types.SimpleNamespace(batch=items)))
    image, label = ev._batch
    assert image.shape == (3, 1, 8, 8) and label.shape == (3, 1, 8, 8)
    assert image[:, 0, 0, 0].tolist() == [0.0, 1.0, 2.0]


def test_collated_batch_is_kept(tmp_path):
    ev = _evaluator(tmp_path)
    batch = {"image": torch.ones(2, 1, 8, 8), "label": torch.zeros(2, 1, 8, 8)}
    ev.observe_batch(types.SimpleNamespace(state=types.SimpleNamespace(batch=batch)))
    assert ev._batch[0].shape == (2, 1, 8, 8)
