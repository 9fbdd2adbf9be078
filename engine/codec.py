"""The mapper between domain events and stored bytes: Avro, then zstd for large bodies.

Stored form (``encode``)::

    byte 0      schema version of the writer (see SCHEMAS); readers resolve old versions
    byte 1      flags: bit 0 = body is zstd-compressed
    bytes 2..   Avro binary body (schemaless, writer schema = SCHEMAS[version])

Integrity is not this module's job: every backend of the Log seals what it stores with a
checksum (engine/frame.py), and the same sealed frame travels on the wire.

Invariant: ``decode(encode(e)) == e`` for every event, and records written by any older
schema version in SCHEMAS still decode (Avro schema resolution, new fields have defaults).

Hot path: the events the capture produces for every write (Write, MirrorData and the
SetAttr of a file's new mtime) and the mirror's per-file MirrorFile and MirrorFileEnd are
written and read by hand-rolled Avro (``_FAST``), tens of microseconds per event cheaper
than fastavro's generic walk and with one copy of the data instead of four. The bytes are
exactly fastavro's (tests compare both on random events); any other record, or one the
fast reader cannot parse, goes through fastavro.
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

CURRENT_VERSION = 4
COMPRESS_ABOVE = 512  # bytes of Avro body; smaller bodies rarely shrink enough to pay off
_ZSTD_LEVEL = 1
_FLAG_ZSTD = 1
_PLAIN = bytes((CURRENT_VERSION, 0))


def _load(name: str) -> dict:
    text = resources.files("datatether.schemas").joinpath(name).read_text()
    return fastavro.parse_schema(json.loads(text))


SCHEMAS: dict[int, dict] = {1: _load("event.v1.avsc"), 2: _load("event.v2.avsc"), 3: _load("event.v3.avsc"),
                             4: _load("event.avsc")}
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
        elif isinstance(value, str) and isinstance(f.default, bytes):
            value = value.encode("latin-1")  # a bytes default, which Avro writes as a string
        kwargs[f.name] = value
    return cls(**kwargs)


def avro_body(event: ev.Event) -> bytes:
    """The Avro binary body of ``event`` under the current schema (before compression)."""
    fast = _FAST_WRITERS.get(type(event.op))
    if fast is not None:
        return b"".join(fast(event))
    return generic_avro_body(event)


def generic_avro_body(event: ev.Event) -> bytes:
    """``avro_body`` by fastavro, for every kind of event (the reference for the fast path)."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, SCHEMAS[CURRENT_VERSION], {
        "time_ns": event.time_ns, "origin": event.origin, "op": _op_to_avro(event.op)})
    return buf.getvalue()


def encode(event: ev.Event, *, compress: bool = True) -> bytes:
    """The stored form of ``event``. ``compress=False`` never compresses (a writer whose
    events are mostly file data on their way to a local log, see engine/mirror.py); then
    a hot-path event's data is copied once, straight into the result."""
    if not compress:
        fast = _FAST_WRITERS.get(type(event.op))
        return b"".join([_PLAIN, *fast(event)] if fast is not None else [_PLAIN, generic_avro_body(event)])
    body = avro_body(event)
    if len(body) > COMPRESS_ABOVE:
        packed = _compressor().compress(body)
        if len(packed) < len(body):
            return b"".join((bytes((CURRENT_VERSION, _FLAG_ZSTD)), packed))
    return b"".join((_PLAIN, body))


def decode(blob: bytes, *, views: bool = False) -> ev.Event:
    """Decode a stored event; raises CorruptRecord for anything that is not one.

    ``views``: the data of a hot-path Write or MirrorData is a read-only memoryview of
    ``blob`` instead of a copy, for a consumer that uses the event at once (the applier
    writes it and lets it go)."""
    if len(blob) < 3 or blob[0] not in SCHEMAS:
        raise CorruptRecord(reason="unknown schema version or truncated record")
    version, flags = blob[0], blob[1]
    try:
        if flags & _FLAG_ZSTD:
            body, start = _decompressor().decompress(blob[2:]), 0
        else:
            body, start = blob, 2
        if version == CURRENT_VERSION:
            event = _fast_read(body, start, views)
            if event is not None:
                return event
        rec = fastavro.schemaless_reader(io.BytesIO(body[start:]), SCHEMAS[version], SCHEMAS[CURRENT_VERSION],
                                         return_record_name=True)
        name, op_body = rec["op"]
        return ev.Event(op=_op_from_avro(name, op_body), time_ns=rec["time_ns"], origin=rec["origin"])
    except CorruptRecord:
        raise
    except Exception as exc:  # any decoding failure means the bytes are not a valid event
        raise CorruptRecord(reason=f"undecodable event: {exc}") from exc


# -- the hot path: Avro binary by hand for the events of every write ---------------------
# Avro: long = zigzag varint; bytes and string = long length + the bytes; union = long
# branch index + the value; a record = its fields in order.

def _long(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _branch(name: str) -> int:
    """Index of an operation's record in the ``op`` union of the current schema."""
    op_field = next(f for f in SCHEMAS[CURRENT_VERSION]["fields"] if f["name"] == "op")
    return next(i for i, branch in enumerate(op_field["type"]) if branch["name"] == _NAMESPACE + name)


def _head(event: ev.Event, branch: bytes, path: str) -> list[bytes]:
    origin = event.origin.encode("utf-8")
    raw_path = os.fsencode(path)
    return [_long(event.time_ns), _long(len(origin)), origin, branch, _long(len(raw_path)), raw_path]


def _data_writer(cls):
    branch = _long(_branch(cls.__name__))

    def parts(event: ev.Event) -> list[bytes]:
        op = event.op
        return _head(event, branch, op.path) + [_long(op.offset), _long(len(op.data)), op.data]
    return parts


_NULL, _SOME = _long(0), _long(1)
_MAP_END = _long(0)
_ATTR_FIELDS = ("mode", "uid", "gid", "atime_ns", "mtime_ns")  # all ["null", int|long]


def _set_attr_writer():
    branch = _long(_branch("SetAttr"))

    def parts(event: ev.Event) -> list[bytes]:
        op = event.op
        out = _head(event, branch, op.path)
        for name in _ATTR_FIELDS:
            value = getattr(op, name)
            out += (_NULL,) if value is None else (_SOME, _long(value))
        return out
    return parts


def _enum_symbols(name: str) -> list[str]:
    """Symbols of a named enum of the current schema, in their Avro order."""
    def find(node):
        if isinstance(node, dict):
            if node.get("type") == "enum" and node.get("name") == _NAMESPACE + name:
                return node["symbols"]
            node = list(node.values())
        if isinstance(node, list):
            for child in node:
                found = find(child)
                if found is not None:
                    return found
        return None
    return find(SCHEMAS[CURRENT_VERSION])


_KINDS = _enum_symbols("FileKind")


def _optional_bytes(value: str | None) -> list[bytes]:
    if value is None:
        return [_NULL]
    raw = os.fsencode(value)
    return [_SOME, _long(len(raw)), raw]


def _mirror_file_writer():
    """The mirror's header of every object (with its content, the whole of a small file)."""
    branch = _long(_branch("MirrorFile"))
    kinds = {kind: _long(index) for index, kind in enumerate(_KINDS)}

    def parts(event: ev.Event) -> list[bytes]:
        op = event.op
        out = _head(event, branch, op.path)
        out += [kinds[op.kind], _long(op.mode), _long(op.uid), _long(op.gid), _long(op.atime_ns),
                _long(op.mtime_ns), _long(op.size), _long(op.rdev)]
        out += _optional_bytes(op.link_target) + _optional_bytes(op.hardlink_of)
        if op.xattrs:  # an Avro map: one block of entries, then an empty block
            out.append(_long(len(op.xattrs)))
            for name, value in op.xattrs.items():
                key = name.encode("utf-8")
                out += [_long(len(key)), key, _long(len(value)), value]
        out += [_MAP_END, b"\x01" if op.whole else b"\x00", _long(len(op.data)), op.data]
        if op.digest is None:
            out.append(_NULL)
        else:
            out += [_SOME, _long(len(op.digest)), op.digest]
        return out
    return parts


def _mirror_file_end_writer():
    branch = _long(_branch("MirrorFileEnd"))

    def parts(event: ev.Event) -> list[bytes]:
        op = event.op
        return _head(event, branch, op.path) + [_long(op.size), _long(len(op.digest)), op.digest, _long(op.mtime_ns),
                                                 _long(len(op.block_digests)), op.block_digests]
    return parts


_FAST_WRITERS = {ev.Write: _data_writer(ev.Write), ev.MirrorData: _data_writer(ev.MirrorData),
                 ev.SetAttr: _set_attr_writer(), ev.MirrorFile: _mirror_file_writer(),
                 ev.MirrorFileEnd: _mirror_file_end_writer()}
_FAST_BRANCHES = {_branch(cls.__name__): cls for cls in _FAST_WRITERS}


def _read_long(buf, pos: int) -> tuple[int, int]:
    byte = buf[pos]
    n, shift = byte & 0x7F, 7
    while byte & 0x80:
        pos += 1
        byte = buf[pos]
        n |= (byte & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos + 1


def _read_bytes(buf, pos: int, view: bool = False) -> tuple[bytes, int]:
    size, pos = _read_long(buf, pos)
    end = pos + size
    if size < 0 or end > len(buf):
        raise ValueError("truncated")
    return (memoryview(buf).toreadonly()[pos:end] if view else bytes(buf[pos:end])), end


def _read_optional_path(buf, pos: int) -> tuple[str | None, int]:
    some, pos = _read_long(buf, pos)
    if some == 0:
        return None, pos
    if some != 1:
        raise ValueError("bad union branch")
    raw, pos = _read_bytes(buf, pos)
    return os.fsdecode(raw), pos


def _read_mirror_file(buf, pos: int, path: str, views: bool) -> tuple[ev.MirrorFile | None, int]:
    index, pos = _read_long(buf, pos)
    if not 0 <= index < len(_KINDS):
        raise ValueError("bad file kind")
    numbers = []
    for _ in range(7):  # mode, uid, gid, atime_ns, mtime_ns, size, rdev
        value, pos = _read_long(buf, pos)
        numbers.append(value)
    link_target, pos = _read_optional_path(buf, pos)
    hardlink_of, pos = _read_optional_path(buf, pos)
    xattrs: dict[str, bytes] = {}
    count, pos = _read_long(buf, pos)
    while count:
        if count < 0:
            return None, pos  # a block with its byte size: fastavro's business
        for _ in range(count):
            key, pos = _read_bytes(buf, pos)
            xattrs[key.decode("utf-8")], pos = _read_bytes(buf, pos)
        count, pos = _read_long(buf, pos)
    whole = buf[pos]
    if whole > 1:
        raise ValueError("bad boolean")
    data, pos = _read_bytes(buf, pos + 1, views)
    some, pos = _read_long(buf, pos)
    if some == 0:
        file_digest = None
    elif some == 1:
        file_digest, pos = _read_bytes(buf, pos)
    else:
        raise ValueError("bad union branch")
    return ev.MirrorFile(path, ev.FileKind(_KINDS[index]), *numbers, link_target=link_target,
                         hardlink_of=hardlink_of, xattrs=xattrs, whole=bool(whole), data=data,
                         digest=file_digest), pos


def _fast_read(body: bytes, pos: int, views: bool = False) -> ev.Event | None:
    """The event of a current-version body at ``pos`` if it is one of ``_FAST_WRITERS``'
    kinds and parses to the last byte; None otherwise (fastavro decides)."""
    try:
        time_ns, pos = _read_long(body, pos)
        origin, pos = _read_bytes(body, pos)
        branch, pos = _read_long(body, pos)
        cls = _FAST_BRANCHES.get(branch)
        if cls is None:
            return None
        raw_path, pos = _read_bytes(body, pos)
        path = os.fsdecode(raw_path)
        if cls is ev.SetAttr:
            values = []
            for _ in _ATTR_FIELDS:
                some, pos = _read_long(body, pos)
                if some == 0:
                    values.append(None)
                elif some == 1:
                    value, pos = _read_long(body, pos)
                    values.append(value)
                else:
                    return None
            op = ev.SetAttr(path, *values)
        elif cls is ev.MirrorFile:
            op, pos = _read_mirror_file(body, pos, path, views)
            if op is None:
                return None
        elif cls is ev.MirrorFileEnd:
            size, pos = _read_long(body, pos)
            file_digest, pos = _read_bytes(body, pos)
            mtime_ns, pos = _read_long(body, pos)
            block_digests, pos = _read_bytes(body, pos)
            op = ev.MirrorFileEnd(path, size, file_digest, mtime_ns, block_digests)
        else:
            offset, pos = _read_long(body, pos)
            data, pos = _read_bytes(body, pos, views)
            op = cls(path, offset, data)
        if pos != len(body):
            return None
        return ev.Event(op=op, time_ns=time_ns, origin=origin.decode("utf-8"))
    except (IndexError, ValueError):
        return None
