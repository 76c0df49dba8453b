"""Bytes of the tensor messages of :mod:`monai_fedpriv.fl.messages` (per-batch activations and gradients, dataset
uploads), decoded as hostile input like an update (:mod:`monai_fedpriv.fl.decoding`)::

    b"MFPT" | version | header length | header (UTF-8 JSON, zlib) | dense tensor blocks

The header holds ``kind``, ``site``, ``round``, ``step``, ``meta`` and ``fields``: for each tensor field of the kind,
its entries (key, shape, dtype, sizes). Dense tensors decode to exactly the bytes they carry, so no header can make
the receiver allocate more than the message holds; a :class:`ShapeExpect` (the receiver's expectation: the site it
talks to, the round, each tensor's shape with free dimensions, at most so many bytes) is checked before any tensor
is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.messages import TENSOR_MESSAGES, check_message_fields
from monai_fedpriv.fl.update import int_problem, shown, site_problem
from monai_fedpriv.fl.wire import CODEC_VERSION, MAX_HEADER_BYTES, PREFIX, read_entries

__all__ = ["TENSOR_MAGIC", "ShapeExpect", "decode_tensor_message", "encode_tensor_message"]

TENSOR_MAGIC = b"MFPT"
_FIELDS = ("kind", "site", "round", "step", "fields", "meta")


@dataclass(frozen=True)
class ShapeExpect:
    """What the receiver of a tensor message expects.

    Args:
        kind: the message kind.
        site: the site it talks to (``None``: any valid name).
        round: the round in progress (``None``: any).
        shapes: ``{"field.key": shape}`` with ``None`` for a free dimension; every key of the kind's fields must be
            listed and sent, no other.
        max_bytes: the most payload bytes the message may carry.
    """

    kind: str
    site: str | None = None
    round: int | None = None
    shapes: Mapping[str, tuple[int | None, ...]] = field(default_factory=dict)
    max_bytes: int = 2**31


def encode_tensor_message(message: Any) -> bytes:
    """Serialise a message of :data:`~monai_fedpriv.fl.messages.TENSOR_MESSAGES` (dense tensors)."""
    from monai_fedpriv.fl.codec import _encode_tensors, _pack

    check_message_fields(message)
    who = f"{message.kind} message from {message.site!r} (round {message.round})"
    fields, blocks = {}, []
    for name, tensors in message.fields().items():
        entries, raw = _encode_tensors(tensors, None, who)
        fields[name] = entries
        blocks += raw
    header = {"kind": message.kind, "site": message.site, "round": message.round, "step": message.step,
              "fields": fields, "meta": message.meta}  # fmt: skip
    return _pack(TENSOR_MAGIC, header, blocks, who)


def _header(data: bytes, expect: ShapeExpect | None) -> tuple[dict[str, Any], int, str]:
    from monai_fedpriv.fl.decoding import _finite, parse_header

    if len(data) < PREFIX.size:
        raise UpdateError(f"encoded message is {len(data)} bytes, shorter than its {PREFIX.size}-byte prefix.")
    magic, version, head_len = PREFIX.unpack_from(data, 0)
    if magic != TENSOR_MAGIC or version != CODEC_VERSION:
        raise UpdateError(f"not an encoded tensor message of version {CODEC_VERSION} ({magic!r}, {version}).")
    start = PREFIX.size + head_len
    if head_len > MAX_HEADER_BYTES or start > len(data):
        raise UpdateError(f"encoded tensor message: header length {head_len} is past its cap or the message.")
    header = parse_header(bytes(data[PREFIX.size : start]), MAX_HEADER_BYTES, "tensor message")
    who = "malformed tensor message"
    if set(header) != set(_FIELDS):
        raise UpdateError(f"{who}: header fields {shown(sorted(header))}, expected {list(_FIELDS)}.")
    kind = header["kind"]
    if not isinstance(kind, str) or kind not in TENSOR_MESSAGES or (expect is not None and kind != expect.kind):
        wanted = expect.kind if expect is not None else sorted(TENSOR_MESSAGES)
        raise UpdateError(f"{who}: kind {shown(kind)}, expected {wanted}.")
    problem = site_problem(header["site"]) or int_problem("round", header["round"], 1) or \
        int_problem("step", header["step"])  # fmt: skip
    if problem is None and (not isinstance(header["meta"], dict) or not _finite(header["meta"])):
        problem = f"meta field is {shown(header['meta'])}, expected an object of finite numbers"
    if problem is None and expect is not None and expect.site is not None and header["site"] != expect.site:
        problem = f"site field is {header['site']!r}, expected {expect.site!r}"
    if problem is None and expect is not None and expect.round is not None and header["round"] != expect.round:
        problem = f"round field is {header['round']}, expected {expect.round}"
    if problem is not None:
        raise UpdateError(f"{who}: {problem}.")
    return header, start, f"{kind} message from {header['site']!r} (round {header['round']})"


def _fits(shape: tuple[int, ...], want: tuple[int | None, ...]) -> bool:
    return len(shape) == len(want) and all(w is None or s == w for s, w in zip(shape, want, strict=True))


def decode_tensor_message(data: bytes, expect: ShapeExpect | None = None) -> Any:
    """Inverse of :func:`encode_tensor_message` for untrusted bytes (``UpdateError`` naming the sender and field)."""
    from monai_fedpriv.fl.decoding import _decode_tensors

    header, start, who = _header(data, expect)
    cls = TENSOR_MESSAGES[header["kind"]]
    raw_fields = header["fields"]
    if not isinstance(raw_fields, dict) or set(raw_fields) != set(cls.tensor_fields):
        raise UpdateError(f"{who}: fields {shown(raw_fields)}, expected {list(cls.tensor_fields)}.")
    entries = {name: read_entries(raw_fields[name], name, False, None, who) for name in cls.tensor_fields}
    for name, keys in getattr(cls, "field_keys", {}).items():  # fields that hold fixed tensors (an upload's)
        got = [e.key for e in entries[name]]
        if got != list(keys):
            raise UpdateError(f"{who}: field {name!r} holds tensors {shown(got)}, expected {list(keys)}.")
    described = sum(e.val_bytes for es in entries.values() for e in es)
    if described != len(data) - start:
        raise UpdateError(f"{who}: its header describes {described} payload bytes, the message holds "
                          f"{len(data) - start}.")  # fmt: skip
    if expect is not None:
        if described > expect.max_bytes:
            raise UpdateError(f"{who}: {described} payload bytes, more than the {expect.max_bytes} expected.")
        sent = {f"{name}.{e.key}": e.shape for name, es in entries.items() for e in es}
        if set(sent) != set(expect.shapes):
            extra, missing = sorted(set(sent) - set(expect.shapes)), sorted(set(expect.shapes) - set(sent))
            raise UpdateError(f"{who}: unexpected tensors {shown(extra, 120)}, missing tensors {shown(missing, 120)}.")
        for key, shape in sent.items():
            if not _fits(shape, tuple(expect.shapes[key])):
                want = ["*" if w is None else w for w in expect.shapes[key]]
                raise UpdateError(f"{who}: {key} has shape {list(shape)}, expected {want}.")
    view, offset = memoryview(data), start
    fields = {}
    for name in cls.tensor_fields:
        fields[name], _, offset = _decode_tensors(entries[name], view, offset)
    message = cls.build(header["site"], header["round"], header["step"], fields, header["meta"])
    check_message_fields(message)
    return message
