"""The mapper between domain events and stored bytes: Avro, then zstd for large bodies.

Stored form (``encode``)::

    byte 0      schema version of the writer (see SCHEMAS); readers resolve old versions
    byte 1      flags: bit 0 = body is zstd-compressed
    bytes 2..   Avro binary body (schemaless, writer schema = SCHEMAS[version])

Integrity is not this module's job: every backend of the Log seals what it stores with a
checksum (engine/frame.py), and the same sealed frame travels on the wire.

Invariant: ``decode(encode(e)) == e`` for every event, and records written by any older
schema version in SCHEMAS still decode (Avro schema resolution, new fields have defaults).
"""

from __future__ import annotations

import io
import json
import os
import threading
from dataclasses import fields
from importlib import resources

import fastavro
import zstandard

from . import events as ev
from .errors import CorruptRecord

CURRENT_VERSION = 2
COMPRESS_ABOVE = 512  # bytes of Avro body; smaller bodies rarely shrink enough to pay off
_ZSTD_LEVEL = 1
_FLAG_ZSTD = 1


def _load(name: str) -> dict:
    text = resources.files("datatether.schemas").joinpath(name).read_text()
    return fastavro.parse_schema(json.loads(text))


SCHEMAS: dict[int, dict] = {1: _load("event.v1.avsc"), 2: _load("event.avsc")}
_NAMESPACE = "datatether.event."
_BYTES_FIELDS = set(ev.PATH_FIELDS) | {"target", "link_target", "root", "name"}
# zstandard's (de)compressor objects must not be used by two threads at once (capture,
# mirror and applier threads encode and decode concurrently): one pair per thread.
_zstd = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_zstd, "compressor"):
        _zstd.compressor = zstandard.ZstdCompressor(level=_ZSTD_LEVEL)
    return _zstd.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_zstd, "decompressor"):
        _zstd.decompressor = zstandard.ZstdDecompressor()
    return _zstd.decompressor


def _op_to_avro(op) -> tuple[str, dict]:
    out = {}
    for f in fields(op):
        value = getattr(op, f.name)
        if isinstance(value, ev.FileKind):
            value = value.value
        elif f.name == "rules":
            value = [{"path": r.path, "include": r.include, "recursive": r.recursive} for r in value]
        elif f.name == "xattrs":
            value = dict(value)
        elif f.name in _BYTES_FIELDS and isinstance(value, str) and not _is_string_field(op, f.name):
            value = os.fsencode(value)
        out[f.name] = value
    return _NAMESPACE + type(op).__name__, out


def _is_string_field(op, name: str) -> bool:
    # 'name' is bytes for xattrs but a plain string for markers, tasks and sets.
    return name == "name" and not isinstance(op, (ev.SetXattr, ev.RemoveXattr))


def _op_from_avro(record_name: str, body: dict):
    cls = ev.OPERATIONS[record_name.rsplit(".", 1)[-1]]
    kwargs = {}
    for f in fields(cls):
        value = body[f.name]
        if isinstance(value, bytes) and f.name in _BYTES_FIELDS:
            value = os.fsdecode(value)
        elif f.name == "kind" and isinstance(value, str):
            value = ev.FileKind(value)
        elif f.name == "rules":
            value = [ev.Rule(**r) for r in value]
        kwargs[f.name] = value
    return cls(**kwargs)


def encode(event: ev.Event) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, SCHEMAS[CURRENT_VERSION], {
        "time_ns": event.time_ns, "origin": event.origin, "op": _op_to_avro(event.op)})
    body = buf.getvalue()
    flags = 0
    if len(body) > COMPRESS_ABOVE:
        packed = _compressor().compress(body)
        if len(packed) < len(body):
            body, flags = packed, _FLAG_ZSTD
    return bytes((CURRENT_VERSION, flags)) + body


def decode(blob: bytes) -> ev.Event:
    """Decode a stored event; raises CorruptRecord for anything that is not one."""
    if len(blob) < 3 or blob[0] not in SCHEMAS:
        raise CorruptRecord(reason="unknown schema version or truncated record")
    version, flags, body = blob[0], blob[1], blob[2:]
    try:
        if flags & _FLAG_ZSTD:
            body = _decompressor().decompress(body)
        rec = fastavro.schemaless_reader(io.BytesIO(body), SCHEMAS[version], SCHEMAS[CURRENT_VERSION],
                                         return_record_name=True)
        name, op_body = rec["op"]
        return ev.Event(op=_op_from_avro(name, op_body), time_ns=rec["time_ns"], origin=rec["origin"])
    except CorruptRecord:
        raise
    except Exception as exc:  # any decoding failure means the bytes are not a valid event
        raise CorruptRecord(reason=f"undecodable event: {exc}") from exc
