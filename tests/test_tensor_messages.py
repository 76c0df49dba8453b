"""The tensor messages of split learning and FedReplay (Activations, Gradients, LatentUpload) on the wire: bit-exact
round trips through the codec's ``encode``/``decode``, every refusal of a :class:`ShapeExpect` naming what is wrong,
non-finite values and row-count mismatches refused, and seeded fuzzing of hostile bytes (each outcome a valid message
or an ``UpdateError``, never another exception)."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import CODECS, Expected, decode, encode
from monai_fedpriv.fl.messages import TENSOR_MESSAGES, Activations, Gradients, LatentUpload, check_message_fields
from monai_fedpriv.fl.tensor_codec import TENSOR_MAGIC, ShapeExpect, decode_tensor_message
from monai_fedpriv.fl.update import ModelUpdate
from tests.test_codec_fuzz import flip_payload, truncate_or_extend

PREFIX = struct.Struct("<4sBI")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def activations(site="site-2", rnd=3, step=5, seed=0, cls=Activations) -> Activations:
    g = _gen(seed)
    return cls(site, rnd, step, {
        "features": torch.randn(4, 8, 6, 6, generator=g),
        "skip": torch.randn(4, 3, generator=g).double(),
        "half": torch.randn(2, 5, generator=g).half(),
        "brain": torch.randn(3, 2, generator=g).to(torch.bfloat16),
        "index": torch.randint(-50, 50, (7,), generator=g),
        "mask": torch.rand(2, 2, generator=g) < 0.5,
        "empty": torch.zeros(0, 4),
    }, {"batch": 4, "privacy": {"eps": 1.5}, "names": ["a", "b"]})  # fmt: skip


def upload(site="site-2", rnd=2, n=6, seed=0) -> LatentUpload:
    g = _gen(seed)
    latents = torch.randn(n, 4, 5, 5, generator=g)
    labels = (torch.rand(n, 1, 10, 10, generator=g) < 0.3).float()
    return LatentUpload(site, rnd, latents, labels, {"items_per_unit": 2, "protected": False})


def act_expect(site="site-2", rnd=3, **changes) -> ShapeExpect:
    shapes = {"tensors.features": (None, 8, 6, 6), "tensors.skip": (None, 3), "tensors.half": (2, 5),
              "tensors.brain": (3, 2), "tensors.index": (7,), "tensors.mask": (2, 2),
              "tensors.empty": (0, 4)}  # fmt: skip
    kw = {"kind": "activations", "site": site, "round": rnd, "shapes": shapes, **changes}
    return ShapeExpect(**kw)


def upload_expect(site="site-2", rnd=2, **changes) -> ShapeExpect:
    kw = {"kind": "latents", "site": site, "round": rnd,
          "shapes": {"latents.latents": (None, 4, 5, 5), "labels.labels": (None, 1, 10, 10)}, **changes}  # fmt: skip
    return ShapeExpect(**kw)


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    _, _, n = PREFIX.unpack_from(data, 0)
    start = PREFIX.size + n
    return data[: PREFIX.size], json.loads(zlib.decompress(data[PREFIX.size : start])), data[start:]


def pack(header_text: bytes, payload: bytes, magic: bytes = TENSOR_MAGIC, version: int = 1) -> bytes:
    head = zlib.compress(header_text)
    return PREFIX.pack(magic, version, len(head)) + head + payload


def reheader(data: bytes, change) -> bytes:
    _, head, payload = split(data)
    change(head)
    return pack(json.dumps(head).encode(), payload)


def assert_same_message(got, sent) -> None:
    assert type(got) is type(sent)
    assert (got.kind, got.site, got.round, got.step, got.meta) == (sent.kind, sent.site, sent.round, sent.step,
                                                                   sent.meta)  # fmt: skip
    assert got.fields().keys() == sent.fields().keys()
    for name, tensors in sent.fields().items():
        assert list(got.fields()[name]) == list(tensors), name  # same keys, same order
        for key, t in tensors.items():
            back = got.fields()[name][key]
            assert back.dtype == t.dtype and back.shape == t.shape, (name, key)
            if t.dtype == torch.bfloat16:  # compare the bits
                assert torch.equal(back.view(torch.int16), t.view(torch.int16)), (name, key)
            else:
                assert torch.equal(back, t), (name, key)


# ---------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", ["activations", "gradients", "latents"])
def test_each_kind_round_trips_bit_exact_through_the_codec(kind):
    assert {"activations", "gradients", "latents"} <= set(TENSOR_MESSAGES)
    assert set(TENSOR_MESSAGES) <= set(CODECS)
    if kind == "latents":
        sent, expect = upload(), upload_expect()
    else:
        cls = Activations if kind == "activations" else Gradients
        sent, expect = activations(cls=cls), act_expect(kind=kind)
    data = encode(sent)
    assert data[:4] == TENSOR_MAGIC == b"MFPT"
    _, head, _ = split(data)
    assert head["kind"] == kind  # every tensor kind shares the magic and names itself in the header
    for exp in (None, expect):
        got = decode(data, exp)
        assert_same_message(got, sent)
        check_message_fields(got)
        assert got is not sent
    _, _, payload = split(data)
    assert len(payload) == sent.nbytes()  # dense tensors travel as exactly their own bytes


def test_an_upload_keeps_its_step_and_the_items_count():
    sent = LatentUpload("a.b@c-1", 7, torch.randn(3, 2, generator=_gen(1)), torch.rand(3, generator=_gen(2)),
                        {"x": [1, 2.5, None, True, "s"]}, step=4)  # fmt: skip
    got = decode(encode(sent))
    assert_same_message(got, sent)
    assert got.items == 3


# ---------------------------------------------------------------------------------------------------- expectations
@pytest.mark.parametrize(
    "expect,match",
    [
        (act_expect(site="site-3"), r"site field is 'site-2', expected 'site-3'"),
        (act_expect(rnd=4), r"round field is 3, expected 4"),
        (act_expect(kind="gradients"), r"kind 'activations', expected gradients"),
        (act_expect(kind="latents"), r"kind 'activations', expected latents"),
        (act_expect(shapes={**act_expect().shapes, "tensors.features": (None, 8, 6, 7)}),
         r"tensors.features has shape \[4, 8, 6, 6\], expected \['\*', 8, 6, 7\]"),
        (act_expect(shapes={**act_expect().shapes, "tensors.features": (4, 8, 6)}),
         r"tensors.features has shape \[4, 8, 6, 6\], expected \[4, 8, 6\]"),
        (act_expect(shapes={k: v for k, v in act_expect().shapes.items() if k != "tensors.skip"}),
         r"tensors\.skip"),  # sent, not expected: named whatever its place in the sorted keys
        (act_expect(shapes={**act_expect().shapes, "tensors.zmissing": (1,)}),
         r"tensors\.zmissing"),  # expected, not sent
        (act_expect(max_bytes=100), r"payload bytes, more than the 100 expected"),
    ],
    ids=["site", "round", "kind", "kind-upload", "shape", "ndim", "extra-tensor", "missing-tensor", "bytes"],
)  # fmt: skip
def test_a_shape_expectation_refuses_each_mismatch_naming_it(expect, match):
    data = encode(activations())
    with pytest.raises(UpdateError, match=match) as info:
        decode(data, expect)
    assert type(info.value) is UpdateError


def test_an_upload_expectation_refuses_the_wrong_item_shape_and_size():
    data = encode(upload())
    with pytest.raises(UpdateError, match=r"latents.latents has shape \[6, 4, 5, 5\], expected \['\*', 8, 5, 5\]"):
        decode(data, upload_expect(shapes={"latents.latents": (None, 8, 5, 5), "labels.labels": (None, 1, 10, 10)}))
    size = upload().nbytes()
    assert size == 6 * 100 * 4 * 2  # latents and labels, float32
    match = rf"from 'site-2' \(round 2\): {size} payload bytes, more than the {size - 1}"
    with pytest.raises(UpdateError, match=match):
        decode(data, upload_expect(max_bytes=size - 1))
    assert isinstance(decode(data, upload_expect(max_bytes=size)), LatentUpload)
    with pytest.raises(UpdateError, match=r"site field is 'site-2', expected 'site-1'"):
        decode(data, upload_expect(site="site-1"))


def test_a_huge_declared_tensor_is_refused_before_any_allocation():
    """A header describing 2**31 - 1 float32 elements over a 24-byte payload: the blocks do not add up (and with an
    expectation the byte cap refuses it too); nothing of the described size is ever allocated."""
    data = encode(LatentUpload("s", 1, torch.ones(2, 3), torch.zeros(2, 1)))
    huge = reheader(data, lambda h: h["fields"]["latents"][0].update(shape=[2**31 - 1], val_bytes=4 * (2**31 - 1)))
    with pytest.raises(UpdateError, match=r"describes 8589934596 payload bytes, the message holds 32"):
        decode(huge)
    over = reheader(data, lambda h: h["fields"]["latents"][0].update(shape=[2**31, 1]))
    with pytest.raises(UpdateError, match=r"more than 2147483647 elements"):
        decode(over)


# ---------------------------------------------------------------------------------------------------- typed values
def _with_payload_float(data: bytes, index: int, value: float) -> bytes:
    """``data`` with the ``index``-th float32 of its payload replaced by ``value``."""
    prefix, head, payload = split(data)
    buf = bytearray(payload)
    struct.pack_into("<f", buf, 4 * index, value)
    return data[: len(data) - len(payload)] + bytes(buf)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_latents_or_labels_are_refused_at_both_ends(value):
    bad = upload()
    bad.latents[2, 1, 0, 3] = value
    with pytest.raises(UpdateError, match=r"latents message from 'site-2': latents \('latents'\) contains NaN or Inf"):
        encode(bad)
    data = encode(upload())
    n_latents = upload().latents.numel()
    for index, field in ((17, "latents"), (n_latents + 5, "labels")):
        hostile = _with_payload_float(data, index, value)
        for exp in (None, upload_expect()):
            with pytest.raises(UpdateError, match=rf"{field} \('{field}'\) contains NaN or Inf"):
                decode(hostile, exp)
    act = activations()
    act.tensors["half"][0, 0] = value
    with pytest.raises(UpdateError, match=r"tensors \('half'\) contains NaN or Inf"):
        encode(act)


def test_as_many_labels_as_latents_or_refused():
    bad = LatentUpload("site-2", 2, torch.randn(3, 4), torch.zeros(2, 1))
    with pytest.raises(UpdateError, match=r"latents \[3, 4\] and labels \[2, 1\] should hold one row per item"):
        encode(bad)
    for latents, labels in ((torch.randn(4), torch.zeros(4)), (torch.randn(3, 4), torch.tensor(0.0))):
        with pytest.raises(UpdateError, match="should hold one row per item"):
            check_message_fields(LatentUpload("site-2", 2, latents, labels))
    # the same mismatch in hostile bytes: the labels' header says [1, 3] for the 3 values of a [3, 1]
    data = encode(LatentUpload("site-2", 2, torch.randn(3, 4), torch.zeros(3, 1)))
    hostile = reheader(data, lambda h: h["fields"]["labels"][0].update(shape=[1, 3]))
    with pytest.raises(UpdateError, match=r"latents \[3, 4\] and labels \[1, 3\] should hold one row per item"):
        decode(hostile)


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda h: h.update(kind=["latents"]), r"kind \['latents'\], expected"),
        (lambda h: h.update(kind={"a": 1}), r"kind \{'a': 1\}, expected"),
        (lambda h: h.update(kind="update"), r"kind 'update', expected"),
        (lambda h: h.update(site="../etc"), r"site field is '../etc'"),
        (lambda h: h.update(round=0), r"round field is 0, expected an int from 1"),
        (lambda h: h.update(step=-1), r"step field is -1"),
        (lambda h: h.update(step=True), r"step field is True \(a bool\)"),
        (lambda h: h.update(meta=[]), r"meta field is \[\], expected an object"),
        (lambda h: h.update(meta={"e": float("nan")}), r"meta field is .*finite numbers"),
        (lambda h: h["fields"].pop("labels"), r"fields \{'latents'.*expected \['latents', 'labels'\]"),
        (lambda h: h["fields"].update(extra=[]), r"fields .*expected \['latents', 'labels'\]"),
        (lambda h: h.update(fields=[]), r"fields \[\], expected"),
        (lambda h: h["fields"]["latents"][0].update(encoding="indices"), r"encoding field is 'indices'"),
        (lambda h: h["fields"]["latents"][0].update(dtype="complex64"), r"dtype field is 'complex64'"),
        (lambda h: h.pop("step"), r"header fields .*expected"),
    ],
    ids=["kind-list", "kind-dict", "kind-update", "site", "round", "step", "step-bool", "meta-list", "meta-nan",
         "missing-field", "extra-field", "fields-list", "sparse", "dtype", "no-step"],
)  # fmt: skip
def test_typed_wrong_header_fields_are_update_errors_naming_the_field(change, match):
    data = reheader(encode(upload()), change)
    for exp in (None, upload_expect()):
        with pytest.raises(UpdateError, match=match):
            decode(data, exp)


def test_an_upload_whose_tensor_keys_are_not_its_fields_is_an_update_error():
    """The header names the tensor of each field; ``LatentUpload.build`` reads ``fields['latents']['latents']``, so a
    renamed or missing key must be refused as malformed, not raise ``KeyError`` (and an extra one must not vanish)."""
    data = encode(upload())
    renamed = reheader(data, lambda h: h["fields"]["latents"][0].update(key="other"))
    emptied = reheader(data, lambda h: h["fields"].update(labels=[]))
    for hostile in (renamed, emptied):
        with pytest.raises(UpdateError):
            decode(hostile)
    _, head, payload = split(data)
    extra = dict(head["fields"]["labels"][0], key="extra")
    head["fields"]["labels"].append(extra)
    label_bytes = extra["val_bytes"]
    hostile = pack(json.dumps(head).encode(), payload + payload[-label_bytes:])
    with pytest.raises(UpdateError):
        decode(hostile)  # a second labels tensor that no field of the message can hold: refused, not dropped


def test_decode_with_the_other_kind_of_expectation_is_an_update_error():
    """``decode`` picks the decoder by the bytes' magic, which the sender chooses: tensor-message bytes sent where an
    update is expected (``Expected``), or update bytes where a tensor message is (``ShapeExpect``), are the sender's
    fault and must be an ``UpdateError``, not an ``AttributeError`` of the receiver's expectation."""
    tensor_bytes = encode(activations())
    update_bytes = encode(ModelUpdate("site-2", 3, {"w": torch.ones(3)}, 1, 1))
    with pytest.raises(UpdateError):
        decode(tensor_bytes, Expected.of({"w": torch.ones(3)}, "site-2", 3))
    with pytest.raises(UpdateError):
        decode(update_bytes, act_expect())


def test_bytes_that_are_no_tensor_message_are_refused():
    data = encode(upload())
    for hostile, match in ((b"", "no known message kind"), (b"MFPT", "shorter than its 9-byte prefix"),
                           (b"MFPT" + data[4:5].replace(b"\x01", b"\x02") + data[5:], "not an encoded tensor message"),
                           (data[:9] + data[9:20], "header length .* is past"),
                           (data + b"\x00", "describes 4800 payload bytes, the message holds 4801"),
                           (data[:-1], "describes 4800 payload bytes, the message holds 4799")):  # fmt: skip
        with pytest.raises(UpdateError, match=match):
            decode(hostile)
        if hostile[:4] == TENSOR_MAGIC:
            with pytest.raises(UpdateError, match=match):
                decode_tensor_message(hostile, upload_expect())


# ---------------------------------------------------------------------------------------------------- fuzzing
POOL = [-1, 0, 1, 2, 3, 7, 2**28, 2**31, 2**40, 2**63, 10**400, 1e12, 1.5, float("nan"), float("inf"), "1", "many",
        None, True, False, [], {}, [2**28], [-1, 4], [2**40, 2**40], [4, 8, 6, 6], [6, 1, 10, 10], [[1]], {"a": 1},
        "float32", "float16", "int64", "bool", "bogus", "dense", "indices", "activations", "gradients", "latents",
        "labels", "tensors", "site-2", "site-3", "x" * 600]  # fmt: skip


def _entries(head: dict) -> list[list]:
    fields = head.get("fields")
    return [v for v in fields.values() if isinstance(v, list) and v] if isinstance(fields, dict) else []


def mutate_header(head: dict, rng: np.random.Generator) -> bytes:
    """One random change of a parsed tensor-message header, as JSON text (possibly with duplicate keys)."""
    kind = int(rng.integers(0, 10))
    lists = _entries(head)
    if kind <= 2 and lists:  # a field of a tensor entry: replaced or removed
        entries = lists[int(rng.integers(0, len(lists)))]
        entry = entries[int(rng.integers(0, len(entries)))]
        field = list(entry)[int(rng.integers(0, len(entry)))]
        if kind == 2:
            del entry[field]
        else:
            entry[field] = POOL[int(rng.integers(0, len(POOL)))]
    elif kind == 3:  # a top-level field
        field = list(head)[int(rng.integers(0, len(head)))]
        head[field] = POOL[int(rng.integers(0, len(POOL)))]
    elif kind == 4:  # a top-level field removed or added
        field = list(head)[int(rng.integers(0, len(head)))]
        head.pop(field) if rng.random() < 0.5 else head.update(extra=1)
    elif kind == 5 and lists:  # a duplicated, dropped or moved tensor entry
        entries = lists[int(rng.integers(0, len(lists)))]
        i = int(rng.integers(0, len(entries)))
        choice = rng.random()
        if choice < 0.4:
            entries.append(dict(entries[i]))
        elif choice < 0.7:
            entries.pop(i)
        else:
            others = [v for v in lists if v is not entries] or [entries]
            others[0].append(entries.pop(i))
    elif kind == 6 and isinstance(head.get("fields"), dict):  # a field of the kind removed, renamed or added
        fields = head["fields"]
        name = list(fields)[int(rng.integers(0, len(fields)))] if fields else "tensors"
        choice = rng.random()
        if choice < 0.3:
            fields.pop(name, None)
        elif choice < 0.6:
            fields[str(POOL[int(rng.integers(0, len(POOL)))])] = fields.pop(name, [])
        else:
            fields[name] = POOL[int(rng.integers(0, len(POOL)))]
    elif kind == 7:  # a shape changed within the same element count (rows moved between latents and labels)
        if lists:
            entries = lists[int(rng.integers(0, len(lists)))]
            entry = entries[int(rng.integers(0, len(entries)))]
            shape = entry.get("shape")
            if isinstance(shape, list) and all(isinstance(d, int) for d in shape):
                numel = int(np.prod(shape)) if shape else 1
                entry["shape"] = [numel] if rng.random() < 0.5 else [1, numel, *([1] * int(rng.integers(0, 3)))]
    elif kind == 8:  # deep nesting, written as text
        depth = int(rng.choice([20, 31, 40, 5000]))
        head["meta"] = "DEEP"
        return json.dumps(head).replace('"DEEP"', "[" * depth + "]" * depth).encode()
    else:  # a duplicate JSON key
        return json.dumps(head).replace("{", '{"round": 1, ', 1).encode()
    return json.dumps(head).encode()


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A hostile variant of a valid encoding."""
    prefix, head, payload = split(data)
    kind = int(rng.integers(0, 7))
    if kind <= 2:
        return pack(mutate_header(head, rng), payload, magic=prefix[:4])
    if kind == 3 and payload:  # flipped payload bytes (NaN and Inf patterns included, by chance)
        return flip_payload(data, payload, rng)
    if kind == 4:  # truncated or extended anywhere
        return truncate_or_extend(data, rng)
    if kind == 5:  # flipped bytes of the prefix or the compressed header
        buf = bytearray(data)
        i = int(rng.integers(0, min(len(buf), PREFIX.size + 40)))
        buf[i] ^= int(rng.integers(1, 256))
        return bytes(buf)
    return rng.bytes(int(rng.integers(0, 200))) if rng.random() < 0.5 else prefix + rng.bytes(int(rng.integers(0, 200)))


def assert_valid(message, expect: ShapeExpect | None) -> None:
    """A decoded message is well formed (and the expected one, when there is an expectation)."""
    assert type(message) in TENSOR_MESSAGES.values()
    check_message_fields(message)
    if isinstance(message, LatentUpload):
        assert message.latents.dim() >= 2 and message.labels.shape[0] == message.latents.shape[0]
    if expect is not None:
        assert (message.kind, message.site, message.round) == (expect.kind, expect.site, expect.round)
        sent = {f"{name}.{k}": tuple(t.shape) for name, ts in message.fields().items() for k, t in ts.items()}
        assert set(sent) == set(expect.shapes)
        for key, shape in sent.items():
            want = expect.shapes[key]
            assert len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want, strict=True)), key
        assert message.nbytes() <= expect.max_bytes


def test_fuzzed_tensor_messages_decode_to_valid_messages_or_update_errors():
    """4000 seeded mutations of encoded Activations and LatentUploads, each decoded with and without a
    ``ShapeExpect``: every outcome is a valid message or an ``UpdateError`` (any other exception is collected and
    reported with the case that raised it), and both outcomes occur."""
    rng = np.random.default_rng(2024)
    small_act = Activations("site-2", 3, 1, {"features": torch.randn(2, 8, 6, 6, generator=_gen(5))}, {"b": 2})
    seeds = [
        (encode(activations()), act_expect()),
        (encode(small_act), act_expect(shapes={"tensors.features": (None, 8, 6, 6)})),
        (encode(Gradients("site-2", 3, 2, {"g": torch.randn(3, 2, generator=_gen(6))})),
         ShapeExpect("gradients", "site-2", 3, {"tensors.g": (3, 2)}, max_bytes=24)),
        (encode(upload()), upload_expect()),
        (encode(upload(n=1, seed=3)), upload_expect(max_bytes=10_000)),
    ]  # fmt: skip
    outcomes = {"decoded": 0, "decoded_expected": 0, "refused": 0}
    other: dict[str, tuple[int, str]] = {}
    for case in range(4000):
        data_in, expect = seeds[case % len(seeds)]
        data = mutate(data_in, rng)
        for exp in (expect, None):
            try:
                got = decode(data, exp)
            except UpdateError:
                outcomes["refused"] += 1
            except Exception as exc:  # noqa: BLE001 - what the contract forbids: collected, reported below
                other.setdefault(f"{type(exc).__name__}: {str(exc)[:80]}", (case, "expect" if exp else "none"))
            else:
                assert_valid(got, exp)
                outcomes["decoded"] += 1
                outcomes["decoded_expected"] += exp is not None
    assert not other, f"exceptions other than UpdateError (first case of each): {other}"
    assert outcomes["decoded"] > 600 and outcomes["refused"] > 4000, outcomes  # both kinds were exercised
    assert outcomes["decoded_expected"] > 300, outcomes  # ... with the expectation too
