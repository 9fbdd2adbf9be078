import io
import json
import os
from importlib import resources

import fastavro
import pytest

from datatether.engine import codec, events as ev, frame
from datatether.engine.errors import CorruptRecord

SAMPLES = [
    ev.Create("dir/new file", ev.FileKind.FILE, 0o640, 1000, 1000, 1, 2),
    ev.Write("a\nb", 1 << 40, b"\0" * 5000),
    ev.Truncate("f", 0),
    ev.Fallocate("f", 1, 0, 4096),
    ev.SetAttr("f", mode=0o600),
    ev.SetXattr("f", "user.comment", b"\xff\x00"),
    ev.RemoveXattr("f", "user.comment"),
    ev.Rename("-leading dash", "ünïcode"),
    ev.Link("f", "g"),
    ev.Symlink("l", "/abs/target", 0, 0, 5),
    ev.Unlink(os.fsdecode(b"not-utf8-\xfe")),
    ev.Rmdir("d", recursive=True),
    ev.Barrier("f"),
    ev.BlockWrite("disk0", 512, b"x" * 512),
    ev.BlockDiscard("disk0", 0, 4096),
    ev.BlockFlush("disk0"),
    ev.MirrorStart("m1", "checksum", 10),
    ev.MirrorFile("f", ev.FileKind.SYMLINK, 0o777, 0, 0, 1, 2, 0, link_target="x", xattrs={"user.a": b"b"}),
    ev.MirrorData("f", 65536, b"data"),
    ev.MirrorFileEnd("f", 10, b"\x01" * 32, 3),
    ev.MirrorEnd("m1", 10, 0, 1),
    ev.TaskCommand("t1", "snap", ["echo", "hi"]),
    ev.TaskResult("t1", 0, "hi\n", 7),
    ev.Marker("before-upgrade", "note"),
    ev.Gap("kernel queue overflow"),
    ev.ReplicationSetDefinition("data", 3, "/srv", [ev.Rule("/srv/*.db", False, True)]),
]


@pytest.mark.parametrize("op", SAMPLES, ids=lambda op: type(op).__name__)
def test_every_operation_round_trips(op):
    event = ev.Event(op, 123, "fuse")
    assert codec.decode(codec.encode(event)) == event


def test_every_schema_record_has_a_class_and_docs():
    schema = json.loads(resources.files("datatether.schemas").joinpath("event.avsc").read_text())
    op_field = next(f for f in schema["fields"] if f["name"] == "op")
    names = {rec["name"] for rec in op_field["type"]}
    assert names == set(ev.OPERATIONS)

    def walk(node):
        if isinstance(node, dict):
            if "name" in node and "type" in node and node.get("type") not in ("record", "enum"):
                assert node.get("doc"), f"field {node['name']} has no doc"
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    walk(schema)


def test_record_written_with_schema_v1_still_decodes():
    """A version-1 writer (before the 'origin' field) is read with the current schema."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.SCHEMAS[1], {
        "time_ns": 42, "op": ("datatether.event.Write", {"path": b"f", "offset": 3, "data": b"abc"})})
    event = codec.decode(bytes((1, 0)) + buf.getvalue())
    assert event == ev.Event(ev.Write("f", 3, b"abc"), 42, origin="cli")


@pytest.mark.parametrize("compress", [True, False])
def test_decoding_with_views_lends_the_data_instead_of_copying_it(compress):
    event = ev.Event(ev.MirrorData("f", 7, b"abc" * 1000), 5, "mirror")
    blob = codec.encode(event, compress=compress)
    decoded = codec.decode(blob, views=True)
    assert isinstance(decoded.op.data, memoryview) and decoded.op.data.readonly
    assert decoded == event and bytes(decoded.op.data) == event.op.data
    assert isinstance(codec.decode(blob).op.data, bytes)


def test_record_written_with_schema_v2_still_decodes():
    """A version-2 MirrorFileEnd (before block_digests) reads with the field's default."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.SCHEMAS[2], {"time_ns": 42, "origin": "mirror", "op": (
        "datatether.event.MirrorFileEnd", {"path": b"f", "size": 3, "digest": b"d" * 32, "mtime_ns": 7})})
    event = codec.decode(bytes((2, 0)) + buf.getvalue())
    assert event == ev.Event(ev.MirrorFileEnd("f", 3, b"d" * 32, 7, block_digests=b""), 42, origin="mirror")


def test_record_written_with_schema_v3_still_decodes():
    """A version-3 MirrorFile (before a small file's content could travel in it) reads as
    a header whose data and digest follow in their own events."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, codec.SCHEMAS[3], {"time_ns": 42, "origin": "mirror", "op": (
        "datatether.event.MirrorFile", {"path": b"f", "kind": "FILE", "mode": 0o644, "uid": 1, "gid": 2,
                                        "atime_ns": 5, "mtime_ns": 6, "size": 3})})
    event = codec.decode(bytes((3, 0)) + buf.getvalue())
    assert event == ev.Event(ev.MirrorFile("f", ev.FileKind.FILE, 0o644, 1, 2, 5, 6, 3), 42, origin="mirror")
    assert event.op.data == b"" and event.op.digest is None and not event.op.complete


def test_a_whole_small_file_in_its_mirror_file_event_round_trips_with_views():
    op = ev.MirrorFile("f", ev.FileKind.FILE, 0o600, 0, 0, 1, 2, 3000, data=b"abc" * 1000, digest=b"d" * 32)
    event = ev.Event(op, 5, "mirror")
    decoded = codec.decode(codec.encode(event, compress=False), views=True)
    assert decoded == event and decoded.op.complete and isinstance(decoded.op.data, memoryview)
    assert event.data_bytes() == 3000


def test_large_bodies_are_compressed():
    blob = codec.encode(ev.Event(ev.Write("f", 0, b"a" * 100_000), 1))
    assert len(blob) < 2000


@pytest.mark.parametrize("op", [ev.MirrorData("f", 7, b"a" * 100_000), ev.Marker("m", "a" * 100_000)])
def test_uncompressed_encoding_round_trips(op):
    event = ev.Event(op, 1)
    blob = codec.encode(event, compress=False)
    assert blob == bytes((codec.CURRENT_VERSION, 0)) + codec.avro_body(event)
    assert codec.decode(blob) == event


@pytest.mark.parametrize("blob", [b"", b"\x09\x00abc", b"\x02\x00\xff\xff\xff", b"\x02\x01notzstd"])
def test_garbage_is_a_corrupt_record(blob):
    with pytest.raises(CorruptRecord):
        codec.decode(blob)


# A version 1 frame (blake3) of b"payload bytes", as logs written before version 2 hold it.
FRAME_V1 = b"DF\x01" + bytes.fromhex("6c6ae296b33b8a174f30d509d28f5c87") + b"payload bytes"


@pytest.mark.parametrize("sealed", [frame.seal(b"payload bytes"), FRAME_V1], ids=["v2", "v1"])
def test_frame_detects_any_flipped_bit(sealed):
    assert frame.unseal(sealed) == b"payload bytes"
    for i in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[i] ^= 0x10
        with pytest.raises(CorruptRecord):
            frame.unseal(bytes(damaged))


def test_frames_are_written_in_the_current_version():
    sealed = frame.seal(b"payload bytes")
    assert sealed[:3] == b"DF" + bytes((frame.VERSION,)) and frame.VERSION == 2
    assert len(sealed) == frame.HEADER_LEN + len(b"payload bytes")


def test_a_frame_of_an_unknown_version_is_corrupt():
    sealed = bytearray(frame.seal(b"payload bytes"))
    sealed[2] = 9
    with pytest.raises(CorruptRecord, match="bad frame header"):
        frame.unseal(bytes(sealed))


def test_encoding_from_many_threads_at_once():
    """The daemon's capture, mirror and applier threads share the codec."""
    import threading

    from datatether.engine.events import Event, Write

    events = [Event(Write(f"f{i}", i, bytes([i % 251]) * (700 + i)), i) for i in range(200)]
    failures = []

    def work():
        try:
            for _ in range(20):
                for e in events:
                    assert codec.decode(codec.encode(e)) == e
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            failures.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def _random_hot_events(rng, count):
    """Events of every hand-encoded kind with the values Avro encodes differently: varint
    widths, negative numbers, empty and non-UTF-8 paths, empty and large data, optional
    paths, empty and several xattrs."""
    def number(bits):
        return rng.choice([0, 1, -1, 63, 64, -64, -65, 8191, 8192]) if rng.random() < 0.3 else \
            rng.randrange(-(1 << (bits - 1)), 1 << (bits - 1))

    def path():
        raw = bytes(rng.randrange(1, 256) for _ in range(rng.choice([0, 1, 5, 200])))
        return os.fsdecode(raw.replace(b"/", b"_"))

    def maybe_path():
        return path() if rng.random() < 0.5 else None

    for _ in range(count):
        kind = rng.choice([ev.Write, ev.MirrorData, ev.SetAttr, ev.MirrorFile, ev.MirrorFileEnd])
        if kind is ev.SetAttr:
            values = [number(32) if rng.random() < 0.5 else None for _ in range(3)]
            values += [number(64) if rng.random() < 0.5 else None for _ in range(2)]
            op = ev.SetAttr(path(), *values)
        elif kind is ev.MirrorFile:
            xattrs = {rng.choice(["user.a", "security.ünï", "trusted." + "x" * 200]) + str(i): rng.randbytes(
                rng.choice([0, 3, 300])) for i in range(rng.choice([0, 0, 1, 3]))}
            complete = rng.random() < 0.5  # a whole small file in the event
            op = ev.MirrorFile(path(), rng.choice(list(ev.FileKind)), number(32), number(32), number(32),
                               number(64), number(64), number(64), number(64), maybe_path(), maybe_path(),
                               xattrs, rng.random() < 0.5,
                               data=rng.randbytes(rng.choice([0, 1, 600, 70_000])) if complete else b"",
                               digest=rng.randbytes(32) if complete else None)
        elif kind is ev.MirrorFileEnd:
            op = ev.MirrorFileEnd(path(), number(64), rng.randbytes(rng.choice([0, 32])), number(64),
                                  rng.randbytes(rng.choice([0, 16, 16 * 300])))
        else:
            op = kind(path(), number(64), rng.randbytes(rng.choice([0, 1, 600, 70_000])))
        yield ev.Event(op, number(64), rng.choice(["fuse", "mirror", "ünï", ""]))


def test_hot_path_writes_exactly_what_fastavro_writes():
    """The hot-path events are encoded by hand (engine/codec.py): byte for byte fastavro's
    body, and decoded back by the hand-written reader and by fastavro alike."""
    import random
    rng = random.Random(7)
    for event in _random_hot_events(rng, 600):
        body = codec.avro_body(event)
        assert body == codec.generic_avro_body(event), event
        read = fastavro.schemaless_reader(io.BytesIO(body), codec.SCHEMAS[codec.CURRENT_VERSION],
                                          return_record_name=True)
        assert read["time_ns"] == event.time_ns and codec._op_from_avro(*read["op"]) == event.op
        assert codec.decode(codec.encode(event)) == event


def test_hot_path_reader_leaves_what_it_cannot_parse_to_fastavro():
    """A body with bytes after the record, or cut short, is not taken by the fast reader:
    fastavro decides (trailing bytes are ignored as before, a cut record is corrupt)."""
    event = ev.Event(ev.Write("f", 7, b"data"), 5, "fuse")
    body = codec.avro_body(event)
    assert codec.decode(bytes((codec.CURRENT_VERSION, 0)) + body + b"\x00") == event
    with pytest.raises(CorruptRecord):
        codec.decode(bytes((codec.CURRENT_VERSION, 0)) + body[:-2])
