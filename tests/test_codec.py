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


def test_large_bodies_are_compressed():
    blob = codec.encode(ev.Event(ev.Write("f", 0, b"a" * 100_000), 1))
    assert len(blob) < 2000


@pytest.mark.parametrize("blob", [b"", b"\x09\x00abc", b"\x02\x00\xff\xff\xff", b"\x02\x01notzstd"])
def test_garbage_is_a_corrupt_record(blob):
    with pytest.raises(CorruptRecord):
        codec.decode(blob)


def test_frame_detects_any_flipped_bit():
    sealed = frame.seal(b"payload bytes")
    assert frame.unseal(sealed) == b"payload bytes"
    for i in range(len(sealed)):
        damaged = bytearray(sealed)
        damaged[i] ^= 0x10
        with pytest.raises(CorruptRecord):
            frame.unseal(bytes(damaged))


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
