"""Decoding untrusted codec bytes (:func:`decode_update`, :func:`decode_global`; the layout is in
:mod:`monai_fedpriv.fl.codec`, the order of the checks and the caps in :mod:`monai_fedpriv.fl.wire`).

Nothing is allocated before the header has been inflated (bounded), depth-checked, parsed and every field typed and
checked, the blocks add up to the payload and, with an :class:`~monai_fedpriv.fl.wire.Expected`, the message is the
expected model's; every failure is an :class:`~monai_fedpriv.errors.UpdateError` naming the sender and the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import torch

from monai_fedpriv.errors import UpdateError
from monai_fedpriv.fl.positions import decode_positions
from monai_fedpriv.fl.update import GlobalModel, ModelUpdate, check_fields, int_problem, shown, site_problem
from monai_fedpriv.fl.wire import (
    CODEC_VERSION,
    DTYPES,
    GLOBAL_MAGIC,
    MAGIC,
    MAX_DECODED_BYTES,
    MAX_DEPTH,
    MAX_HEADER_BYTES,
    PREFIX,
    Entry,
    Expected,
    inflate,
    read_entries,
)

__all__ = ["decode_global", "decode_update", "json_depth"]

_ESCAPE = re.compile(rb"\\.", re.DOTALL)  # an escape and the character it escapes (an escaped quote included)
_STRING = re.compile(rb'"[^"]*"')  # once escapes are gone: each quote is matched once, so linear in the length
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_depth(text: bytes) -> int:
    """Deepest nesting of ``[``/``{`` in JSON ``text`` (strings skipped), counted without parsing it, in time linear
    in the length whatever the text (a string pattern with escapes inside would rescan an unterminated string from
    every quote)."""
    skeleton = _NOT_BRACKET.sub(b"", _STRING.sub(b"", _ESCAPE.sub(b"", text)))
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int32)
    return int(np.cumsum(steps).max())


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise UpdateError(f"key {shown(twice)} appears twice in one JSON object")
    return out


def _finite(value: Any) -> bool:
    """Whether a parsed JSON value holds only finite numbers (its depth is bounded, so recursion is safe)."""
    if isinstance(value, float):
        return bool(np.isfinite(value))
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


def parse_header(block: bytes, limit: int, what: str) -> dict[str, Any]:
    """The header object of a message: inflated (bounded), depth-checked, parsed with duplicate keys refused (a
    NaN or Infinity is left to the typed checks of the fields, which name the field)."""
    text = inflate(block, limit, f"header of the encoded {what}")
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise UpdateError(f"malformed encoded {what}: its header nests {depth} levels deep (at most {MAX_DEPTH}).")
    try:
        header = json.loads(text.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UpdateError as exc:
        raise UpdateError(f"malformed encoded {what}: header: {exc}.") from exc
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, and ints past Python's digit limit
        raise UpdateError(f"corrupt header in encoded {what}: {exc}") from exc
    if not isinstance(header, dict):
        raise UpdateError(f"malformed encoded {what}: its header is a {type(header).__name__}, not an object.")
    return header


def _from_raw(data: bytes | memoryview, name: str, count: int) -> torch.Tensor:
    dtype, code = DTYPES[name]
    arr = np.frombuffer(data, dtype=np.dtype(code), count=count)
    out = torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))
    return out.view(torch.bfloat16) if dtype == torch.bfloat16 else out


def _decode_tensors(
    entries: list[Entry], data: memoryview, offset: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int]:
    """Tensors (and masks of sparse ones) of checked ``entries`` from the blocks at ``offset``."""
    tensors: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for e in entries:
        pos = data[offset : offset + e.pos_bytes]
        raw = data[offset + e.pos_bytes : offset + e.pos_bytes + e.val_bytes]
        offset += e.pos_bytes + e.val_bytes
        if e.encoding == "dense":
            tensors[e.key] = _from_raw(raw, e.dtype, e.numel).reshape(e.shape)
            continue
        mask = decode_positions(e.encoding, bytes(pos), e.numel, e.count, e.key)
        count = int(np.count_nonzero(mask))
        if count != e.count:
            raise UpdateError(f"sparse tensor {e.key!r}: its position block holds {count} coordinates, not {e.count}.")
        flat = torch.zeros(e.numel, dtype=DTYPES[e.dtype][0])
        flat_mask = torch.from_numpy(mask)
        flat[flat_mask] = _from_raw(raw, e.dtype, count)
        tensors[e.key] = flat.reshape(e.shape)
        masks[e.key] = flat_mask.reshape(e.shape)
    return tensors, masks, offset


_UPDATE_FIELDS = ("site", "round", "n_samples", "local_steps", "sparse", "tensors", "optimizer_state", "meta")


def _who(header: dict[str, Any]) -> str:
    """How messages name the sender: its site (and round) once those fields are valid."""
    if site_problem(header.get("site")) is not None:
        return "malformed encoded update"
    rnd = header.get("round")
    return f"malformed encoded update from {header['site']!r}" + (
        "" if int_problem("round", rnd, minimum=1) else f" (round {rnd})"
    )


def _check_update_header(header: dict[str, Any], expect: Expected | None) -> str:
    """Check the scalar fields of an update header (in order: site, round, counts, ...); returns ``who``."""
    who = _who(header)
    missing = [f for f in _UPDATE_FIELDS if f not in header]
    unknown = sorted(set(header) - set(_UPDATE_FIELDS))
    if missing:
        raise UpdateError(f"{who}: header lacks field {missing[0]!r}.")
    if unknown:
        raise UpdateError(f"{who}: header has unknown fields {shown(unknown)}.")
    problem = (
        site_problem(header["site"])
        or int_problem("round", header["round"], minimum=1)
        or int_problem("n_samples", header["n_samples"])
        or int_problem("local_steps", header["local_steps"])
    )
    if problem is None and not isinstance(header["sparse"], bool):
        problem = f"sparse field is {shown(header['sparse'])}, expected true or false"
    if problem is None and (not isinstance(header["meta"], dict) or not _finite(header["meta"])):
        problem = f"meta field is {shown(header['meta'])}, expected an object of finite numbers"
    if problem is None and expect is not None:
        if expect.site is not None and header["site"] != expect.site:
            problem = f"site field is {header['site']!r}, expected {expect.site!r} (the site that answered)"
        elif expect.round is not None and header["round"] != expect.round:
            problem = f"round field is {header['round']}, expected {expect.round} (the round in progress)"
        elif expect.moments == 0 and header["optimizer_state"] is not None:
            problem = "optimizer_state field: the server expects no optimiser state"
    if problem is not None:
        raise UpdateError(f"{who}: {problem}.")
    return who


def decode_update(data: bytes, expect: Expected | None = None) -> ModelUpdate:
    """Inverse of :func:`encode_update`, for untrusted bytes (see :mod:`monai_fedpriv.fl.wire` for the order of
    the checks): nothing is allocated before the header has been checked, and with ``expect`` nothing that is not
    the expected model's.

    Args:
        data: the encoded update.
        expect: what the receiver expects (the site it asked, the round in progress, the model's keys, shapes and
            dtypes, the optimiser state allowed), or ``None`` (only the global caps apply).

    Raises:
        UpdateError: naming the site (once the header names a valid one) and the field, on anything malformed:
            wrong magic or version, a header past its caps, a wrong-typed or out-of-range field, duplicate keys,
            blocks that do not add up, trailing bytes, or a message that is not the expected one.
    """
    header, view, start = _unpack(data, MAGIC, "update", expect)
    who = _check_update_header(header, expect)
    sparse = header["sparse"]
    delta, masks, optimizer_state = _decode_body(header, view, start, sparse, who, expect)
    update = ModelUpdate(
        site=header["site"],
        round=header["round"],
        delta=delta,
        n_samples=header["n_samples"],
        local_steps=header["local_steps"],
        masks=masks if sparse else None,
        optimizer_state=optimizer_state,
        meta=header["meta"],
    )
    check_fields(update)  # the same typed-field rules as the server's screening
    return update


def _unpack(data: bytes, magic: bytes, what: str, expect: Expected | None) -> tuple[dict[str, Any], memoryview, int]:
    if len(data) < PREFIX.size:
        raise UpdateError(f"encoded {what} is {len(data)} bytes, shorter than its {PREFIX.size}-byte prefix.")
    got, version, head_len = PREFIX.unpack_from(data, 0)
    if got != magic:
        raise UpdateError(f"not an encoded {what} (magic {got!r}, expected {magic!r}).")
    if version != CODEC_VERSION:
        raise UpdateError(f"codec version {version} is not supported (this is version {CODEC_VERSION}).")
    cap = expect.header_cap() if expect is not None else MAX_HEADER_BYTES
    start = PREFIX.size + head_len
    if head_len > cap or start > len(data):
        raise UpdateError(
            f"encoded {what}: header length {head_len} is past the cap of {cap} bytes or the message's "
            f"{len(data)} bytes."
        )
    header = parse_header(bytes(data[PREFIX.size : start]), cap, what)
    return header, memoryview(data), start


def _decode_body(
    header: dict[str, Any], view: memoryview, start: int, sparse: bool, who: str, expect: Expected | None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """``(tensors, masks, optimizer_state)`` from the blocks after the header: every entry is checked, the sizes
    must add up to the payload and (without an expectation) stay under the cap before any tensor is allocated."""
    entries = read_entries(header["tensors"], "tensors", sparse, expect, who)
    opt_entries = None
    if header["optimizer_state"] is not None:
        opt_entries = read_entries(header["optimizer_state"], "optimizer_state", False, expect, who, moments=True)
    every = entries + (opt_entries or [])
    described = sum(e.pos_bytes + e.val_bytes for e in every)
    if described != len(view) - start:
        held = len(view) - start
        raise UpdateError(f"{who}: its header describes {described} payload bytes, the message holds {held}.")
    decoded = sum(e.decoded_bytes for e in every)
    if expect is None and decoded - described > MAX_DECODED_BYTES:  # dense bytes decode to their own size
        raise UpdateError(
            f"{who}: its header describes {decoded} decoded bytes from {described}, more than {MAX_DECODED_BYTES} "
            f"beyond what it carries."
        )
    try:
        tensors, masks, offset = _decode_tensors(entries, view, start)
        optimizer_state = None
        if opt_entries is not None:
            optimizer_state, _, offset = _decode_tensors(opt_entries, view, offset)
    except UpdateError as exc:
        raise UpdateError(f"{who}: {exc}") from exc
    return tensors, masks, optimizer_state


_GLOBAL_FIELDS = ("kind", "round", "stop", "tensors", "optimizer_state", "instructions")
MAX_INSTRUCTIONS = 10_000  # sites a global model can instruct


def _instructions(raw: Any, who: str) -> dict[str, Any]:
    """The per-site round instructions of a global model's header, typed and bounded."""
    from monai_fedpriv.fl.instruction import RoundInstruction

    if not isinstance(raw, dict) or len(raw) > MAX_INSTRUCTIONS:
        raise UpdateError(f"{who}: instructions field is {shown(raw)}, expected an object of at most "
                          f"{MAX_INSTRUCTIONS} sites.")  # fmt: skip
    out = {}
    for site, value in raw.items():
        if (problem := site_problem(site)) is not None:
            raise UpdateError(f"{who}: instructions: {problem}.")
        out[site] = RoundInstruction.from_json(value, f"{who}: instruction for {site!r}")
    return out


def decode_global(data: bytes, expect: Expected | None = None) -> GlobalModel:
    """Inverse of :func:`encode_global`, for untrusted bytes (``UpdateError`` naming the field on anything
    malformed); with ``expect`` (a site's own model: :meth:`Expected.of` its weights) nothing is allocated that is
    not that model's."""
    header, view, start = _unpack(data, GLOBAL_MAGIC, "global model", expect)
    who = "malformed encoded global model"
    if set(header) != set(_GLOBAL_FIELDS) or header["kind"] != GlobalModel.kind:
        fields = shown(sorted(header))
        raise UpdateError(f"{who}: header fields {fields}, expected {list(_GLOBAL_FIELDS)} (kind global).")
    problem = int_problem("round", header["round"])
    if problem is None and not isinstance(header["stop"], bool):
        problem = f"stop field is {shown(header['stop'])}, expected true or false"
    if problem is not None:
        raise UpdateError(f"{who}: {problem}.")
    instructions = _instructions(header["instructions"], who)
    weights, _, optimizer_state = _decode_body(header, view, start, False, f"{who} (round {header['round']})", expect)
    return GlobalModel(header["round"], weights, optimizer_state, header["stop"], instructions)
