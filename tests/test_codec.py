"""Wire encoding of updates: exact round trip, sparse transport, size at q = 10%."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from monai.losses import DiceCELoss
from monai.networks.layers import Norm
from monai.networks.nets import UNet

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import decode_update, encode_update, encoded_size
from monai_fedpriv.fl.update import ModelUpdate
from monai_fedpriv.privacy.budget import PrivacyBudget
from monai_fedpriv.privacy.filters import PercentileSharing, SparseVectorFilter


def header(data: bytes) -> dict:
    _, _, n = struct.unpack_from("<4sBI", data, 0)
    return json.loads(zlib.decompress(data[9 : 9 + n]))


def assert_same(a: ModelUpdate, b: ModelUpdate) -> None:
    assert (a.site, a.round, a.n_samples, a.local_steps, a.meta) == (
        b.site,
        b.round,
        b.n_samples,
        b.local_steps,
        b.meta,
    )
    assert list(a.delta) == list(b.delta)
    for k in a.delta:
        assert a.delta[k].dtype == b.delta[k].dtype and a.delta[k].shape == b.delta[k].shape
        assert torch.equal(a.delta[k], b.delta[k]), k
    assert (a.masks is None) == (b.masks is None)
    if a.masks is not None:
        assert all(torch.equal(a.masks[k], b.masks[k]) for k in a.masks)
    assert (a.optimizer_state is None) == (b.optimizer_state is None)
    if a.optimizer_state is not None:
        assert all(torch.equal(a.optimizer_state[k], b.optimizer_state[k]) for k in a.optimizer_state)


def mixed_update(masks: bool) -> ModelUpdate:
    g = torch.Generator().manual_seed(0)
    delta = {
        "f32": torch.randn(7, 5, generator=g),
        "f64": torch.randn(13, generator=g, dtype=torch.float64),
        "f16": torch.randn(4, 4, generator=g).half(),
        "bf16": torch.randn(6, generator=g).bfloat16(),
        "i64": torch.tensor(42),
        "u8": torch.arange(10, dtype=torch.uint8),
    }
    m = None
    if masks:
        m = {k: torch.rand(v.shape, generator=g) < 0.4 for k, v in delta.items()}
        delta = {k: torch.where(m[k], v, torch.zeros((), dtype=v.dtype)) for k, v in delta.items()}
    opt = {"exp_avg.f32": torch.randn(7, 5, generator=g)}
    meta = {"privacy": {"dp": True, "filter_epsilon": 1.5, "filters": [{"filter": "svt"}]}, "bytes": None}
    return ModelUpdate("site-3", 9, delta, n_samples=12, local_steps=30, masks=m, optimizer_state=opt, meta=meta)


@pytest.mark.parametrize("masks", [False, True])
def test_round_trip_is_exact_for_every_dtype(masks):
    u = mixed_update(masks)
    data = encode_update(u)
    assert encoded_size(u) == len(data)
    assert_same(u, decode_update(data))


def test_dense_tensors_are_raw_little_endian():
    t = torch.tensor([1.0, -2.5, 3.25], dtype=torch.float32)
    data = encode_update(ModelUpdate("s", 1, {"w": t}, 1, 1))
    assert data.endswith(struct.pack("<3f", 1.0, -2.5, 3.25))
    assert header(data)["tensors"][0]["encoding"] == "dense"


@pytest.mark.parametrize(
    "pattern,expected",
    [
        ("few", "indices"),  # 1 coordinate out of 4096
        ("half", "bitmap"),  # random half: incompressible bitmap
        ("block", "bitmap_deflate"),  # one long run plus scattered coordinates
        ("random10", "gaps_rice"),  # random 10%
    ],
)
def test_each_position_encoding_round_trips(pattern, expected):
    g = torch.Generator().manual_seed(1)
    n = 4096
    if pattern == "few":
        mask = torch.zeros(n, dtype=torch.bool)
        mask[5] = True
    elif pattern == "half":
        mask = torch.rand(n, generator=g) < 0.5
    elif pattern == "block":
        mask = torch.rand(n, generator=g) < 0.3
        mask[1000:3000] = True
    else:
        mask = torch.rand(n, generator=g) < 0.1
    values = torch.where(mask, torch.randn(n, generator=g), torch.zeros(()))
    u = ModelUpdate("s", 1, {"w": values.reshape(64, 64)}, 1, 1, masks={"w": mask.reshape(64, 64)})
    data = encode_update(u)
    assert header(data)["tensors"][0]["encoding"] == expected
    assert_same(u, decode_update(data))


def test_empty_mask_round_trips():
    u = ModelUpdate("s", 1, {"w": torch.zeros(3, 3)}, 1, 1, masks={"w": torch.zeros(3, 3, dtype=torch.bool)})
    assert_same(u, decode_update(encode_update(u)))


def test_unshared_values_are_not_sent():
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[:10] = True
    u = ModelUpdate("s", 1, {"w": torch.randn(1000)}, 1, 1, masks={"w": mask})
    out = decode_update(encode_update(u))
    assert torch.equal(out.delta["w"][:10], u.delta["w"][:10]) and torch.all(out.delta["w"][10:] == 0)


@pytest.fixture(scope="module")
def realistic() -> ModelUpdate:
    return realistic_update()


def realistic_update(channels=(24, 48, 96, 192)) -> ModelUpdate:
    """A model delta after a few Adam steps of the bundle's UNet (widened to about 460k parameters)."""
    torch.manual_seed(0)  # the network's own init; every other draw below uses an explicit generator
    net = UNet(2, 1, 3, channels=channels, strides=(2, 2, 2), norm=Norm.INSTANCE, num_res_units=1)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.rand(2, 1, 32, 32, generator=g)
        y = torch.randint(0, 3, (2, 1, 32, 32), generator=g)
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
    delta = {k: v - start[k] for k, v in net.state_dict().items()}
    return ModelUpdate("site-1", 1, delta, n_samples=20, local_steps=2)


@pytest.mark.parametrize("which", ["percentile", "percentile_clipped", "svt"])
def test_ten_percent_is_at_least_eight_times_smaller(which, realistic):
    u = realistic
    size = sum(v.numel() for v in u.delta.values())
    assert 400_000 < size < 600_000
    f = {
        "percentile": PercentileSharing(0.1),
        "percentile_clipped": PercentileSharing(0.1, clip=1e-4),
        "svt": SparseVectorFilter(
            0.1, 1.0, 0.1, 1.0, clip=1e-3, threshold=5e-4, budget=PrivacyBudget(limit=10.0), generator=0
        ),
    }[which]
    sparse = f(u)
    data = encode_update(sparse)
    ratio = u.dense_bytes() / len(data)
    assert ratio >= 8.0, f"{which}: dense {u.dense_bytes()} B, sent {len(data)} B, ratio {ratio:.2f}"
    assert_same(sparse, decode_update(data))
    assert len(encode_update(u)) >= u.dense_bytes()  # the dense baseline really is dense


def test_corrupt_data_is_rejected():
    data = encode_update(mixed_update(True))
    for bad in (b"XXXX" + data[4:], data[:-3], data + b"\0", data[:5], data[:4] + b"\x09" + data[5:]):
        with pytest.raises(UpdateError):
            decode_update(bad)


def _reheader(data: bytes, change) -> bytes:
    """``data`` with its header replaced by ``change(header)`` (what a buggy or hostile sender could write)."""
    _, _, n = struct.unpack_from("<4sBI", data, 0)
    head = header(data)
    change(head)
    packed = zlib.compress(json.dumps(head).encode())
    return data[:4] + struct.pack("<BI", data[4], len(packed)) + packed + data[9 + n :]


@pytest.mark.parametrize(
    "change",
    [
        lambda h: h.pop("sparse"),
        lambda h: h.update(tensors=5),
        lambda h: h["tensors"][0].pop("shape"),
        lambda h: h.update(optimizer_state=[{"key": "x"}]),
    ],
)  # fmt: skip
def test_a_malformed_header_is_an_update_error_not_a_crash(change):
    data = encode_update(mixed_update(True))
    assert_same(decode_update(_reheader(data, lambda h: None)), decode_update(data))  # the rewrite itself is neutral
    with pytest.raises(UpdateError, match="malformed encoded update"):
        decode_update(_reheader(data, change))


def test_unserialisable_meta_and_bad_masks_raise():
    with pytest.raises(UpdateError, match="JSON"):
        encode_update(ModelUpdate("s", 1, {"w": torch.zeros(2)}, 1, 1, meta={"x": object()}))
    with pytest.raises(UpdateError, match="NaN|JSON"):
        encode_update(ModelUpdate("s", 1, {"w": torch.zeros(2)}, 1, 1, meta={"x": float("nan")}))
    with pytest.raises(UpdateError, match="mask"):
        encode_update(ModelUpdate("s", 1, {"w": torch.zeros(2)}, 1, 1, masks={"w": torch.ones(2)}))
    with pytest.raises(UpdateError, match="no mask"):
        encode_update(ModelUpdate("s", 1, {"w": torch.zeros(2)}, 1, 1, masks={}))
