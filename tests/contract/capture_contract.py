"""The capture contract (engine/capture.py), run against every live capture backend.

A backend opts in with a subclass named ``Test...`` that provides one hook::

    class TestMyCapture(CaptureContract):
        @pytest.fixture
        def make_capture(self):
            # (root, sink, on_gap, matches) -> a Capture of root, not started yet
            return lambda root, sink, on_gap, matches: MyCapture(root, sink, matches=matches,
                                                                 on_gap=on_gap)

The suite changes the tree the way applications do (ordinary paths under the root, from
this process) and stops every capture it started. SetAttr events that only carry an mtime
(a backend reports the times its data and name changes caused) are left out of the
comparisons.
"""

from __future__ import annotations

import dataclasses
import os

import pytest

from datatether.engine.capture import Capture
from datatether.engine.events import Create, Rename, SetAttr, Write


def kept(events) -> list:
    """Events as a sink that keeps them must keep them: a Write's data may be a view of
    the backend's buffer, valid during the sink call only (engine/capture.py)."""
    return [dataclasses.replace(e, op=dataclasses.replace(e.op, data=bytes(e.op.data)))
            if isinstance(e.op, Write) else e for e in events]


def only_mtime(op) -> bool:
    return isinstance(op, SetAttr) and op.mtime_ns is not None and (
        op.mode, op.uid, op.gid, op.atime_ns) == (None, None, None, None)


class Sink:
    """Keeps the events it receives, or raises while ``failing``."""

    def __init__(self):
        self.events = []
        self.failing = False

    def __call__(self, events):
        if self.failing:
            raise RuntimeError("queue full")
        self.events.extend(kept(events))

    def ops(self):
        return [e.op for e in self.events if not only_mtime(e.op)]


def not_private(rel: str, is_dir: bool) -> bool:
    return rel != "private" and not rel.startswith("private/")


class CaptureContract:
    @pytest.fixture
    def make_capture(self):
        raise NotImplementedError("a backend's subclass provides make_capture")

    @pytest.fixture
    def root(self, tmp_path):
        root = tmp_path / "root"
        (root / "private").mkdir(parents=True)
        return root

    @pytest.fixture
    def rig(self, make_capture, root):
        """(capture, sink, gap reasons); the capture is started and stopped around the test."""
        sink, gaps = Sink(), []
        capture = make_capture(root, sink, gaps.append, not_private)
        capture.start()
        yield capture, sink, gaps
        capture.stop()

    def test_conforms_and_running_follows_start_and_stop(self, rig):
        capture, _, _ = rig
        assert isinstance(capture, Capture) and capture.running
        capture.stop()
        assert not capture.running

    def test_changes_reach_the_sink_in_order_with_set_relative_paths(self, rig, root):
        capture, sink, gaps = rig
        os.mkdir(root / "d")
        (root / "d" / "f").write_bytes(b"abc")
        os.rename(root / "d" / "f", root / "d" / "g")
        (root / "private" / "secret").write_bytes(b"not captured")
        ops = sink.ops()
        assert [type(op) for op in ops] == [Create, Create, Write, Rename]
        assert [ops[0].path, ops[1].path] == ["d", "d/f"]
        assert ops[2:] == [Write("d/f", 0, b"abc"), Rename("d/f", "d/g")]
        assert {e.origin for e in sink.events} == {capture.origin}
        times = [e.time_ns for e in sink.events]
        assert times == sorted(times) and not gaps

    def test_stop_is_idempotent_and_ends_sink_calls(self, rig, root):
        capture, sink, _ = rig
        capture.stop()
        capture.stop()
        (root / "after-stop").write_bytes(b"x")
        assert sink.events == []

    def test_a_failing_sink_is_a_gap_and_capture_goes_on(self, rig, root):
        capture, sink, gaps = rig
        sink.failing = True
        (root / "during-outage").write_bytes(b"kept on the source")
        assert (root / "during-outage").read_bytes() == b"kept on the source"
        assert gaps and "queue full" in gaps[0]
        sink.failing = False
        (root / "after-outage").write_bytes(b"a")
        assert [op.path for op in sink.ops()] == ["after-outage", "after-outage"]

    def test_starts_again_after_a_stop(self, rig, root):
        capture, sink, _ = rig
        capture.stop()
        capture.start()
        assert capture.running
        (root / "second-run").write_bytes(b"2")
        assert [op.path for op in sink.ops()] == ["second-run", "second-run"]
