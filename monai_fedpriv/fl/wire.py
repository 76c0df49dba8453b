"""Reading untrusted codec bytes before anything is allocated: limits, bounded inflation, the JSON depth of a
header, its typed tensor entries, and what the receiver expects (:class:`Expected`).

A site's bytes (and, at a site, the server's) come from another process that may be buggy or hostile, so the
decoders of :mod:`monai_fedpriv.fl.codec` read them in this order and refuse at the first problem with an
:class:`~monai_fedpriv.errors.UpdateError` naming the site (once the header names a valid one) and the field:

1. the prefix: the header length is at most the cap (:data:`MAX_HEADER_BYTES`, or the smaller one of an
   expectation) and lies within the message;
2. the header is inflated by a bounded ``zlib.decompressobj`` (never past the cap, nothing left over); its nesting
   depth is counted on the inflated text before ``json.loads`` (at most :data:`MAX_DEPTH`, so no ``RecursionError``);
   a duplicate JSON key or a non-finite number is refused;
3. every field is typed and in range; a tensor entry's shape is a list of non-negative ints whose product (exact
   Python ints, no overflow) is bounded, and its block sizes agree with the shape, dtype, encoding and count; with an
   expectation, the keys, shapes and dtypes must be the model's, so nothing larger than the model is described;
   without one, what the header describes may exceed the bytes it carries (unshared coordinates and masks of
   sparse tensors) by at most :data:`MAX_DECODED_BYTES`;
4. only then does the decoder allocate tensors of the checked sizes, and position blocks never inflate past the
   bitmap their tensor needs (:mod:`monai_fedpriv.fl.positions`).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.update import int_problem, shown

__all__ = [
    "CODEC_VERSION", "DTYPES", "GLOBAL_MAGIC", "MAGIC", "MAX_DECODED_BYTES", "MAX_DEPTH", "MAX_HEADER_BYTES",
    "MAX_TENSORS", "PREFIX", "Entry", "Expected", "TensorSpec", "inflate", "read_entries",
]  # fmt: skip

MAGIC = b"MFPU"
GLOBAL_MAGIC = b"MFPG"  # a GlobalModel: the server's answer (dense weights, optional moments, round, stop)
CODEC_VERSION = 1
PREFIX = struct.Struct("<4sBI")  # magic, version, header length

MAX_HEADER_BYTES = 4 * 2**20  # inflated (and so compressed) header
MAX_DEPTH = 32  # JSON nesting of a header, meta included
MAX_TENSORS = 20_000  # entries per list (tensors, optimiser state)
MAX_DIMS = 16
MAX_NUMEL = 2**31 - 1  # sparse positions are int32
MAX_DECODED_BYTES = 512 * 2**20  # decoded beyond the payload, when the receiver has no expectation
MAX_KEY_CHARS = 512
MOMENTS = 3  # optimiser-state tensors per parameter (Adam with amsgrad keeps three)

# dtype name -> (torch dtype, little-endian numpy dtype of its bytes); bfloat16 travels as its int16 bits.
DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "float64": (torch.float64, "<f8"),
    "float32": (torch.float32, "<f4"),
    "float16": (torch.float16, "<f2"),
    "bfloat16": (torch.bfloat16, "<i2"),
    "int64": (torch.int64, "<i8"),
    "int32": (torch.int32, "<i4"),
    "int16": (torch.int16, "<i2"),
    "int8": (torch.int8, "i1"),
    "uint8": (torch.uint8, "u1"),
    "bool": (torch.bool, "?"),
}
DTYPE_NAMES = {dt: name for name, (dt, _) in DTYPES.items()}
ITEMSIZE = {name: np.dtype(code).itemsize for name, (_, code) in DTYPES.items()}
FLOATING = ("float64", "float32", "float16", "bfloat16")
SPARSE_ENCODINGS = ("indices", "bitmap", "bitmap_deflate", "gaps_rice")
_STATE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype name (a key of :data:`DTYPES`) of one tensor the receiver expects."""

    shape: tuple[int, ...]
    dtype: str


@dataclass(frozen=True)
class Expected:
    """What the receiver of a message expects, checked from the header before any payload is read.

    Args:
        tensors: ``{key: TensorSpec}`` of the model (every key must be sent, no other).
        site: the site that was asked (the update's ``site`` must be it), or ``None``.
        round: the round in progress (the update's ``round`` must be it), or ``None``.
        moments: optimiser-state tensors allowed per floating-point tensor of the model (keys
            ``"<key>/<state name>"``, with the tensor's shape and dtype); ``0``: none may be sent.
    """

    tensors: Mapping[str, TensorSpec]
    site: str | None = None
    round: int | None = None
    moments: int = MOMENTS

    @classmethod
    def of(
        cls,
        weights: Mapping[str, torch.Tensor],
        site: str | None = None,
        round: int | None = None,  # noqa: A002 - the field's name on the wire
        moments: int = MOMENTS,
    ) -> Expected:
        """The expectation of a message computed against ``weights`` (a global model or a site's own)."""
        specs = {}
        for key, value in weights.items():
            if value.dtype not in DTYPE_NAMES:
                raise UpdateError(f"cannot expect tensor {key!r} of dtype {value.dtype}; supported: {sorted(DTYPES)}.")
            specs[key] = TensorSpec(tuple(int(d) for d in value.shape), DTYPE_NAMES[value.dtype])
        return cls(specs, site, round, moments)

    def header_cap(self) -> int:
        """Bytes an inflated header of such a message may take (meta included)."""
        return min(MAX_HEADER_BYTES, 2**18 + 1024 * len(self.tensors) * (1 + self.moments))

    def moment(self, key: str) -> TensorSpec | None:
        """The spec of optimiser-state tensor ``key`` (``"<model key>/<state>"``), or ``None`` if not allowed."""
        name, sep, state = key.rpartition("/")
        spec = self.tensors.get(name) if sep and self.moments > 0 else None
        if spec is None or spec.dtype not in FLOATING or not _STATE_NAME.fullmatch(state):
            return None
        return spec


@dataclass(frozen=True)
class Entry:
    """One checked tensor entry of a header; ``count`` is the number of shared coordinates of a sparse tensor."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    count: int
    pos_bytes: int
    val_bytes: int
    numel: int

    @property
    def decoded_bytes(self) -> int:
        """Bytes its decoded tensor (and mask) take."""
        return self.numel * ITEMSIZE[self.dtype] + (self.numel if self.encoding != "dense" else 0)


def inflate(block: bytes, limit: int, what: str) -> bytes:
    """``zlib``-inflate ``block`` to at most ``limit`` bytes: a stream that would inflate further, is truncated or
    has bytes after its end is an ``UpdateError`` (never more than ``limit + 1`` bytes are produced)."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(block, limit + 1)
    except zlib.error as exc:
        raise UpdateError(f"corrupt {what}: {exc}") from exc
    if len(out) > limit:
        raise UpdateError(f"{what} inflates past {limit} bytes.")
    if not inflater.eof or inflater.unused_data:
        raise UpdateError(f"corrupt {what}: {'bytes after' if inflater.eof else 'truncated'} zlib stream.")
    return out


def _entry(raw: Any, where: str, sparse: bool) -> Entry:
    """One tensor entry, typed and self-consistent (``UpdateError`` text without the sender)."""
    if not isinstance(raw, dict):
        raise UpdateError(f"{where} is a {type(raw).__name__}, expected an object")
    key = raw.get("key")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS or not key.isprintable():
        raise UpdateError(f"{where}: key field is {shown(key)}, expected a printable string of 1 to {MAX_KEY_CHARS}")
    where = f"{where} ({key!r})"
    encoding = raw.get("encoding")
    allowed = SPARSE_ENCODINGS if sparse else ("dense",)
    if not isinstance(encoding, str) or encoding not in allowed:
        raise UpdateError(f"{where}: encoding field is {shown(encoding)}, expected one of {list(allowed)}")
    fields = {"key", "shape", "dtype", "encoding", "pos_bytes", "val_bytes"} | ({"count"} if sparse else set())
    if set(raw) != fields:
        raise UpdateError(f"{where}: fields {sorted(raw)}, expected {sorted(fields)}")
    if not isinstance(raw["dtype"], str) or raw["dtype"] not in DTYPES:
        raise UpdateError(f"{where}: dtype field is {shown(raw['dtype'])}, expected one of {sorted(DTYPES)}")
    shape = raw["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise UpdateError(f"{where}: shape field is {shown(shape)}, expected a list of at most {MAX_DIMS} ints")
    numel = 1
    for dim in shape:
        problem = int_problem("shape", dim)
        if problem:
            raise UpdateError(f"{where}: {problem}")
        numel *= dim
        if numel > MAX_NUMEL:
            raise UpdateError(f"{where}: shape {shown(shape)} has more than {MAX_NUMEL} elements")
    for name in ("pos_bytes", "val_bytes", *(("count",) if sparse else ())):
        problem = int_problem(name, raw[name])
        if problem:
            raise UpdateError(f"{where}: {problem}")
    dtype: str = raw["dtype"]
    count, pos, val = raw.get("count", numel), raw["pos_bytes"], raw["val_bytes"]
    if count > numel:
        raise UpdateError(f"{where}: count field is {count}, more than the {numel} elements of its shape")
    need_pos = {"dense": 0, "indices": 4 * count, "bitmap": (numel + 7) // 8}.get(encoding, pos)
    if val != count * ITEMSIZE[dtype] or pos != need_pos or (encoding == "gaps_rice" and pos < 5):
        raise UpdateError(
            f"{where}: pos_bytes {pos} and val_bytes {val} do not fit {count} {dtype} values "
            f"({encoding}, shape {list(shape)})"
        )
    return Entry(key, tuple(shape), dtype, encoding, count, pos, val, numel)


def read_entries(
    raw: Any, field: str, sparse: bool, expect: Expected | None, who: str, moments: bool = False
) -> list[Entry]:
    """The checked tensor entries of header field ``field`` (``"tensors"`` or ``"optimizer_state"``).

    Args:
        raw: the field's value.
        sparse: whether the entries are sparse (position block + shared values) rather than dense.
        expect: the receiver's expectation, or ``None`` (then only the global caps apply).
        who: the sender, for messages (e.g. ``"malformed encoded update from 'site-2' (round 3)"``).
        moments: ``True`` for optimiser-state entries (checked against :meth:`Expected.moment`).
    """
    if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
        raise UpdateError(f"{who}: {field} field is {shown(raw)}, expected a list of at most {MAX_TENSORS} entries.")
    entries: list[Entry] = []
    seen: set[str] = set()
    extra: list[str] = []
    per_tensor: dict[str, int] = {}
    for i, item in enumerate(raw):
        try:
            entry = _entry(item, f"{field}[{i}]", sparse)
        except UpdateError as exc:
            raise UpdateError(f"{who}: {exc}.") from exc
        if entry.key in seen:
            raise UpdateError(f"{who}: {field}: tensor key {entry.key!r} appears twice.")
        seen.add(entry.key)
        if expect is not None:
            spec = expect.moment(entry.key) if moments else expect.tensors.get(entry.key)
            if spec is None:
                extra.append(entry.key)
            elif spec.shape != entry.shape or spec.dtype != entry.dtype:
                raise UpdateError(
                    f"{who}: {field} ({entry.key!r}): shape {list(entry.shape)} {entry.dtype}, but the model's is "
                    f"{list(spec.shape)} {spec.dtype}."
                )
            if moments:
                name = entry.key.rpartition("/")[0]
                per_tensor[name] = per_tensor.get(name, 0) + 1
                if per_tensor[name] > expect.moments:
                    raise UpdateError(f"{who}: {field}: more than {expect.moments} tensors for {name!r}.")
        entries.append(entry)
    if expect is not None and not moments:
        missing = sorted(set(expect.tensors) - seen)
        if missing:
            raise UpdateError(f"{who}: {field}: lacks keys {missing[:5]}{'...' if len(missing) > 5 else ''}.")
    if extra:
        label = "optimiser state names no parameter" if moments else "has keys the global model does not"
        raise UpdateError(f"{who}: {field}: {label}: {extra[:5]}{'...' if len(extra) > 5 else ''}.")
    return entries
