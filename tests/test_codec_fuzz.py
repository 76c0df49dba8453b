"""Issue 16: the decoders never trust the bytes. Property-based fuzzing of both decoders (random bytes, valid
encodings with mutated header fields re-compressed, flipped and truncated payloads and position blocks), each named
hostile case of the issue, and the peak memory of decoding inputs under 1 MB (measured in a child process)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.codec import Expected, decode_global, decode_update, encode_global, encode_update
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate, check_fields

PREFIX = struct.Struct("<4sBI")


def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 2, 3, 3, generator=g),
        "conv.bias": torch.randn(4, generator=g),
        "norm.weight": torch.randn(64, generator=g).double(),
        "head": torch.randn(6, 5, generator=g).half(),
        "steps": torch.tensor(3),
    }


REF = reference()


def expected(site: str = "site-2", rnd: int = 4) -> Expected:
    return Expected.of(REF, site=site, round=rnd)


def update(site="site-2", rnd=4, density: float | None = None, moments=False, seed=0) -> ModelUpdate:
    g = torch.Generator().manual_seed(seed)
    delta = {k: (torch.randn(v.shape, generator=g) * 0.1).to(v.dtype) for k, v in REF.items()}
    masks = None
    if density is not None:
        masks = {k: torch.rand(v.shape, generator=g) < density for k, v in delta.items()}
        delta = {k: torch.where(masks[k], v, torch.zeros((), dtype=v.dtype)) for k, v in delta.items()}
    opt = {"conv.weight/exp_avg": torch.randn(4, 2, 3, 3, generator=g)} if moments else None
    return ModelUpdate(site, rnd, delta, 12, 30, masks=masks, optimizer_state=opt, meta={"privacy": {"eps": 1.5}})


def split(data: bytes) -> tuple[bytes, dict, bytes]:
    magic, version, n = PREFIX.unpack_from(data, 0)
    return data[: PREFIX.size], json.loads(zlib.decompress(data[9 : 9 + n])), data[9 + n :]


def pack(magic: bytes, header_text: bytes, payload: bytes, version: int = 1) -> bytes:
    head = zlib.compress(header_text)
    return PREFIX.pack(magic, version, len(head)) + head + payload


def assert_valid_update(u: ModelUpdate, expect: Expected | None) -> None:
    """A decoded update is a well-formed message (and the expected model's, when there is an expectation)."""
    check_fields(u)
    if expect is not None:
        assert u.site == expect.site and u.round == expect.round
        assert set(u.delta) == set(expect.tensors)
        for key, spec in expect.tensors.items():
            assert tuple(u.delta[key].shape) == spec.shape and str(u.delta[key].dtype) == f"torch.{spec.dtype}"
        for key, value in (u.optimizer_state or {}).items():
            assert expect.moment(key) is not None and tuple(value.shape) == expect.moment(key).shape
    for key, mask in (u.masks or {}).items():
        assert mask.dtype == torch.bool and mask.shape == u.delta[key].shape


def assert_valid_global(m: GlobalModel, expect: Expected | None) -> None:
    assert isinstance(m.round, int) and not isinstance(m.round, bool) and m.round >= 0 and isinstance(m.stop, bool)
    if expect is not None:
        assert {k: (tuple(v.shape), str(v.dtype)) for k, v in m.weights.items()} == {
            k: (s.shape, f"torch.{s.dtype}") for k, s in expect.tensors.items()
        }


# ---------------------------------------------------------------- mutations
POOL = [-1, 0, 1, 7, 2**28, 2**31, 2**40, 2**63, 10**400, 1e12, 1.5, float("nan"), float("inf"), "1", "many", None,
        True, False, [], {}, [2**28], [-1, 4], [2**40, 2**40], [4, 2, 3, 3], [[1]], {"a": 1}, "float32", "bool",
        "bogus", "dense", "indices", "bitmap", "bitmap_deflate", "gaps_rice", "site-2", "x" * 600]  # fmt: skip


def mutate_header(head: dict, rng: np.random.Generator) -> bytes:
    """One random change of a header (parsed), returned as JSON text (possibly with duplicate keys)."""
    kind = rng.integers(0, 8)
    lists = [f for f in ("tensors", "optimizer_state") if isinstance(head.get(f), list) and head[f]]
    if kind <= 2 and lists:  # a tensor entry field
        entries = head[lists[rng.integers(0, len(lists))]]
        entry = entries[rng.integers(0, len(entries))]
        field = list(entry)[rng.integers(0, len(entry))]
        if kind == 2:
            del entry[field]
        else:
            entry[field] = POOL[rng.integers(0, len(POOL))]
    elif kind == 3:  # a top-level field
        field = list(head)[rng.integers(0, len(head))]
        head[field] = POOL[rng.integers(0, len(POOL))]
    elif kind == 4:
        field = list(head)[rng.integers(0, len(head))]
        head.pop(field) if rng.random() < 0.5 else head.update(extra=1)
    elif kind == 5 and lists:  # a duplicate tensor entry
        entries = head[lists[0]]
        entries.append(dict(entries[rng.integers(0, len(entries))]))
    elif kind == 6:  # deep nesting, written as text (json.dumps itself would recurse)
        depth = int(rng.choice([20, 31, 40, 5000]))
        head["meta" if "meta" in head else "round"] = "DEEP"
        return json.dumps(head).replace('"DEEP"', "[" * depth + "]" * depth).encode()
    else:  # a duplicate JSON key
        text = json.dumps(head)
        return text.replace("{", '{"round": 1, ', 1).encode()
    return json.dumps(head).encode()


def flip_payload(data: bytes, payload: bytes, rng: np.random.Generator) -> bytes:
    """``data`` with 1 to 7 bytes of its payload flipped (NaN and Inf patterns included, by chance)."""
    buf = bytearray(payload)
    for i in rng.integers(0, len(buf), size=int(rng.integers(1, 8))):
        buf[int(i)] ^= int(rng.integers(1, 256))
    return data[: len(data) - len(payload)] + bytes(buf)


def truncate_or_extend(data: bytes, rng: np.random.Generator) -> bytes:
    """``data`` cut anywhere, sometimes followed by a few random bytes."""
    cut = int(rng.integers(0, len(data) + 1))
    return data[:cut] + (rng.bytes(int(rng.integers(0, 4))) if rng.random() < 0.3 else b"")


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """A hostile variant of a valid encoding."""
    prefix, head, payload = split(data)
    kind = rng.integers(0, 6)
    if kind <= 1:
        return pack(prefix[:4], mutate_header(head, rng), payload)
    if kind == 2 and payload:  # flipped payload bytes (values and position blocks)
        return flip_payload(data, payload, rng)
    if kind == 3:  # truncated or extended anywhere
        return truncate_or_extend(data, rng)
    if kind == 4:  # flipped bytes of the compressed header or the prefix
        buf = bytearray(data)
        i = int(rng.integers(0, min(len(buf), 9 + 40)))
        buf[i] ^= int(rng.integers(1, 256))
        return bytes(buf)
    return rng.bytes(int(rng.integers(0, 200))) if rng.random() < 0.5 else prefix + rng.bytes(int(rng.integers(0, 200)))


def seeds_of_updates() -> list[bytes]:
    out = [encode_update(update(moments=True)), encode_update(update(rnd=4, seed=1))]
    out += [encode_update(update(density=d, seed=i)) for i, d in enumerate((0.0, 0.01, 0.1, 0.5, 0.9, 1.0))]
    return out


def test_fuzzed_updates_decode_to_valid_messages_or_update_errors():
    rng = np.random.default_rng(16)
    seeds = seeds_of_updates()
    expect = expected()
    outcomes = {"decoded": 0, "refused": 0}
    for case in range(4000):
        data = mutate(seeds[case % len(seeds)], rng)
        for exp in (expect, None):
            try:
                got = decode_update(data, exp)
            except UpdateError:
                outcomes["refused"] += 1
            else:
                assert_valid_update(got, exp)
                outcomes["decoded"] += 1
    assert outcomes["decoded"] > 100 and outcomes["refused"] > 3000, outcomes  # both kinds were exercised


def test_fuzzed_global_models_decode_to_valid_messages_or_update_errors():
    rng = np.random.default_rng(61)
    seeds = [
        encode_global(GlobalModel(3, REF)),
        encode_global(GlobalModel(0, REF, {"conv.bias/exp_avg": REF["conv.bias"]})),
    ]
    expect = Expected.of(REF)
    outcomes = {"decoded": 0, "refused": 0}
    for case in range(2000):
        data = mutate(seeds[case % len(seeds)], rng)
        for exp in (expect, None):
            try:
                got = decode_global(data, exp)
            except UpdateError:
                outcomes["refused"] += 1
            else:
                assert_valid_global(got, exp)
                outcomes["decoded"] += 1
    assert outcomes["decoded"] > 50 and outcomes["refused"] > 1000, outcomes


def test_valid_encodings_round_trip_under_the_expectation():
    for data in seeds_of_updates():
        plain, checked = decode_update(data), decode_update(data, expected())
        assert all(torch.equal(plain.delta[k], checked.delta[k]) for k in plain.delta)
    with pytest.raises(UpdateError, match=r"site field is 'site-2', expected 'site-3' \(the site that answered\)"):
        decode_update(seeds_of_updates()[0], expected(site="site-3"))
    with pytest.raises(UpdateError, match=r"round field is 4, expected 5 \(the round in progress\)"):
        decode_update(seeds_of_updates()[0], expected(rnd=5))
    with pytest.raises(UpdateError, match="expects no optimiser state"):
        decode_update(seeds_of_updates()[0], Expected.of(REF, "site-2", 4, moments=0))


# ---------------------------------------------------------------- the named cases of the issue
def reheader(data: bytes, change) -> bytes:
    prefix, head, payload = split(data)
    change(head)
    return pack(prefix[:4], json.dumps(head).encode(), payload)


def sparse_bomb(shape: int = 2**28) -> bytes:
    """185 bytes: a sparse update whose one tensor has ``shape`` elements and ``count: 0``."""
    header = {"site": "site-2", "round": 4, "n_samples": 1, "local_steps": 1, "sparse": True, "optimizer_state": None,
              "meta": {}, "tensors": [{"key": "conv.weight", "shape": [shape], "dtype": "float32",
                                       "encoding": "indices", "count": 0, "pos_bytes": 0, "val_bytes": 0}]}  # fmt: skip
    return pack(b"MFPU", json.dumps(header).encode(), b"")


@pytest.mark.parametrize(
    "shape,match",
    [([-1, 4], "shape field is -1, expected an int from 0"), ([2**40, 2**40], "more than 2147483647 elements"),
     ([2**63], "shape field is 9223372036854775808, expected an int from 0 to 2"),
     ([4, "2", 3, 3], r"shape field is '2' \(a str\)")],
)  # fmt: skip
def test_negative_overflowing_or_typed_wrong_shapes_are_update_errors(shape, match):
    data = reheader(encode_update(update()), lambda h: h["tensors"][0].update(shape=shape))
    for exp in (None, expected()):
        with pytest.raises(UpdateError, match=match):
            decode_update(data, exp)
    glob = reheader(encode_global(GlobalModel(1, REF)), lambda h: h["tensors"][0].update(shape=shape))
    with pytest.raises(UpdateError, match=match):
        decode_global(glob)


def test_a_meta_nested_200000_deep_is_refused_before_parsing():
    _, head, payload = split(encode_update(update()))
    text = json.dumps({**head, "meta": "DEEP"}).replace('"DEEP"', '{"x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    data = pack(b"MFPU", text.encode(), payload)
    with pytest.raises(UpdateError, match="nests 200002 levels deep"):
        decode_update(data)


def test_a_sparse_update_of_two_to_the_28_elements_and_count_0_is_refused():
    data = sparse_bomb()
    assert len(data) < 200
    with pytest.raises(UpdateError, match="describes 1342177280 decoded bytes from 0, more than 536870912 beyond"):
        decode_update(data)
    with pytest.raises(UpdateError, match=r"shape \[268435456\] float32, but the model's is \[4, 2, 3, 3\] float32"):
        decode_update(data, expected())


@pytest.fixture(scope="module")
def deflate_bomb() -> bytes:
    """About 261 KB of zlib that inflates to 256 MB of set bits (made in chunks: never 256 MB at once)."""
    z = zlib.compressobj(9)
    chunk = b"\xff" * 2**20
    return b"".join([*(z.compress(chunk) for _ in range(256)), z.flush()])


def test_a_bitmap_deflate_bomb_never_inflates_past_the_tensor(deflate_bomb):
    assert 250_000 < len(deflate_bomb) < 270_000
    u = update(density=0.5)
    data = encode_update(u)
    prefix, head, payload = split(data)
    entry = head["tensors"][0]  # conv.weight: 72 elements, a 9-byte bitmap
    blocks = payload[entry["pos_bytes"] :]
    entry.update(encoding="bitmap_deflate", pos_bytes=len(deflate_bomb))
    bomb = pack(b"MFPU", json.dumps(head).encode(), deflate_bomb + blocks)
    for exp in (None, expected()):
        with pytest.raises(UpdateError, match=r"compressed bitmap of tensor 'conv.weight' inflates past 9 bytes"):
            decode_update(bomb, exp)


@pytest.fixture(scope="module")
def header_bomb() -> bytes:
    """Just under 1 MiB of zlib that inflates to 1000 MiB (1.05 GB) of spaces (deflate cannot do much better than
    1000:1): each 1 MiB chunk is compressed after a full flush (no
    history), so its bytes are the same every time and 1 GiB need not be compressed."""
    z = zlib.compressobj(9)
    spaces = b" " * 2**20
    first, second, third = (z.compress(spaces) + z.flush(zlib.Z_FULL_FLUSH) for _ in range(3))
    assert second == third
    adler = 1
    for _ in range(1000):
        adler = zlib.adler32(spaces, adler)
    stream = first + second * 999 + z.flush()[:-4] + struct.pack(">I", adler)
    inflater = zlib.decompressobj()
    assert inflater.decompress(stream, 8 * 2**20) == b" " * 8 * 2**20  # it is what it claims to be
    return stream


def test_a_header_that_inflates_to_a_gigabyte_is_refused_at_the_cap(header_bomb):
    head = header_bomb
    assert len(head) < 2**20
    data = PREFIX.pack(b"MFPU", 1, len(head)) + head
    with pytest.raises(UpdateError, match="header of the encoded update inflates past 4194304 bytes"):
        decode_update(data)
    with pytest.raises(UpdateError, match="header length .* is past the cap"):
        decode_update(data, expected())  # the expected model's header is far smaller: refused before inflating


@pytest.mark.parametrize(
    "field,value,match",
    [("n_samples", float("nan"), r"n_samples field is nan \(a float\), expected an int"),
     ("local_steps", float("inf"), r"local_steps field is inf \(a float\), expected an int"),
     ("local_steps", "many", r"local_steps field is 'many' \(a str\), expected an int"),
     ("local_steps", True, r"local_steps field is True \(a bool\), expected an int"),
     ("n_samples", -3, "n_samples field is -3, expected an int from 0"),
     ("round", "1", r"round field is '1' \(a str\), expected an int"),
     ("site", {"name": "site-2"}, r"site field is \{'name': 'site-2'\} \(a dict\)"),
     ("site", "../etc", r"site field is '../etc' \(a str\), expected a name"),
     ("meta", {"eps": float("nan")}, "meta field is .* expected an object of finite numbers"),
     ("sparse", "yes", "sparse field is 'yes', expected true or false")],
)  # fmt: skip
def test_typed_wrong_fields_are_update_errors_naming_the_field(field, value, match):
    data = reheader(encode_update(update()), lambda h: h.update({field: value}))
    for exp in (None, expected()):
        with pytest.raises(UpdateError, match=match) as info:
            decode_update(data, exp)
        if field != "site":
            assert "from 'site-2'" in str(info.value)  # the header got far enough to name the site


def test_duplicate_tensor_keys_and_duplicate_json_keys_are_refused():
    dup = reheader(encode_update(update()), lambda h: h["tensors"].append(dict(h["tensors"][0])))
    with pytest.raises(UpdateError, match="tensor key 'conv.weight' appears twice"):
        decode_update(dup)
    prefix, head, payload = split(encode_update(update()))
    text = json.dumps(head).replace('"site": "site-2"', '"site": "site-1", "site": "site-2"')
    with pytest.raises(UpdateError, match="key 'site' appears twice in one JSON object"):
        decode_update(pack(b"MFPU", text.encode(), payload))


def test_a_corrupt_gap_block_or_index_block_is_an_update_error():
    u = update(density=0.1)
    data = encode_update(u)
    prefix, head, payload = split(data)
    kinds = {e["encoding"] for e in head["tensors"]}
    assert "gaps_rice" in kinds or "indices" in kinds
    offset = 0
    for entry in head["tensors"]:
        if entry["encoding"] in ("gaps_rice", "indices") and entry["pos_bytes"]:
            buf = bytearray(payload)
            buf[offset : offset + entry["pos_bytes"]] = b"\xff" * entry["pos_bytes"]
            with pytest.raises(UpdateError, match=repr(entry["key"])):
                decode_update(data[: len(data) - len(payload)] + bytes(buf))
        offset += entry["pos_bytes"] + entry["val_bytes"]


# ---------------------------------------------------------------- peak memory
MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from monai_fedpriv.errors import UpdateError
    from monai_fedpriv.fl.codec import Expected, decode_global, decode_update
    from monai_fedpriv.fl.wire import TensorSpec

    def peak_rss():
        return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM"))

    spec = json.load(open(sys.argv[1]))
    expect = Expected({k: TensorSpec(tuple(s), "float32") for k, s in spec["model"].items()}, "site-2", 4)
    model_bytes = sum(4 * torch.Size(s).numel() for s in spec["model"].values())
    warmup = open(sys.argv[2] + "/warmup", "rb").read()
    decode_update(warmup)  # imports and first-call allocations
    try:
        decode_update(warmup, expect)
    except UpdateError:
        pass
    inputs = {name: open(sys.argv[2] + "/" + name, "rb").read() for name in spec["inputs"]}
    assert all(len(data) < 2**20 for data in inputs.values())
    outcome, growth = {}, {}
    for name, data in inputs.items():
        with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) starts again from the current RSS
            f.write("5")
        before = peak_rss()
        decode = decode_global if name.startswith("global") else decode_update
        try:
            result = decode(data, expect)
            outcome[name] = "decoded"
            del result
        except UpdateError as exc:
            outcome[name] = "refused: " + str(exc)[:80]
        growth[name] = peak_rss() - before
    print(json.dumps({"growth": growth, "model_bytes": model_bytes, "outcome": outcome}))
    """
)


def test_decoding_inputs_under_1_mb_stays_under_twice_the_model_size(tmp_path, deflate_bomb, header_bomb):
    """The peak resident memory of a child process (VmHWM, reset through /proc/self/clear_refs after a warm-up):
    its growth while decoding every input, against the model's size. RLIMIT_AS is no use with torch imported (it maps
    far more address space than it touches), and ru_maxrss cannot be reset, so it hides growth under the peak of the
    imports."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident memory")
    shapes = {f"layer{i}.weight": [512, 512] for i in range(16)}  # 16 MiB of float32
    model = {k: torch.zeros(s) for k, s in shapes.items()}
    g = torch.Generator().manual_seed(3)
    masks = {k: torch.rand(s, generator=g) < 0.002 for k, s in shapes.items()}
    sparse = ModelUpdate("site-2", 4, {k: torch.where(masks[k], 1.0, 0.0) for k in shapes}, 1, 1, masks=masks)
    small = ModelUpdate("site-2", 4, {"layer0.weight": torch.zeros(2, 2)}, 1, 1)
    inputs = {"warmup": encode_update(small), "valid_sparse": encode_update(sparse), "sparse_bomb": sparse_bomb()}
    prefix, head, payload = split(inputs["valid_sparse"])
    first = head["tensors"][0]  # its position block becomes the 256 MB deflate bomb
    rest = payload[first["pos_bytes"] :]
    first.update(encoding="bitmap_deflate", pos_bytes=len(deflate_bomb))
    inputs["deflate_bomb"] = pack(b"MFPU", json.dumps(head).encode(), deflate_bomb + rest)
    head_bomb = header_bomb
    inputs["header_bomb"] = PREFIX.pack(b"MFPU", 1, len(head_bomb)) + head_bomb
    inputs["global_header_bomb"] = PREFIX.pack(b"MFPG", 1, len(head_bomb)) + head_bomb
    inputs["deep_meta"] = pack(b"MFPU", b'{"meta": ' + b"[" * 400_000 + b"]" * 400_000 + b"}", b"")
    assert all(len(v) < 2**20 for v in inputs.values())
    for name, data in inputs.items():
        (tmp_path / name).write_bytes(data)
    names = [n for n in inputs if n != "warmup"]
    (tmp_path / "spec.json").write_text(json.dumps({"model": shapes, "inputs": names}))
    del model
    proc = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, str(tmp_path / "spec.json"), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["outcome"]["valid_sparse"] == "decoded"  # a real decode of the whole model was measured too
    assert all(v.startswith("refused") for k, v in result["outcome"].items() if k != "valid_sparse"), result
    assert result["growth"]["valid_sparse"] > result["model_bytes"]  # the measure sees a decode of the whole model
    # (a growth slightly below zero is the allocator handing memory back between the reset and the decode)
    assert all(-(2**20) <= g < 2 * result["model_bytes"] for g in result["growth"].values()), result


def test_an_unterminated_string_of_escaped_quotes_does_not_stall_the_decoder():
    """A header of one quote and 2 million escaped quotes (a few KB compressed) once took the depth pre-scan
    quadratic time (hours at the header cap); it is linear now. The alarm turns a regression into a failure, not
    a hang."""
    import signal

    from monai_fedpriv.fl.decoding import json_depth

    text = b'"' + b'\\"' * 2_000_000
    head = zlib.compress(text, 9)
    data = struct.pack("<4sBI", b"MFPU", 1, len(head)) + head
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(TimeoutError("json_depth is super-linear again")))
    signal.alarm(30)
    try:
        assert json_depth(text) == 0
        with pytest.raises(UpdateError):
            decode_update(data)
    finally:
        signal.alarm(0)
