"""engine/history.py: times, points, reachability under retention, reading and filtering."""

from __future__ import annotations

import json
import time

import pytest
from history_helpers import SECOND, T0, append, corrupt_embedded, create

from datatether.engine import events as ev
from datatether.engine import history
from datatether.engine.errors import CorruptRecord, OutsideHistory, UsageError
from datatether.engine.history import Anchor, Point
from datatether.engine.log_embedded import EmbeddedLog
from datatether.engine.offsets import NO_OFFSET

P = "conn-1"


@pytest.fixture
def log(tmp_path):
    with EmbeddedLog(tmp_path / "log") as opened:
        opened.ensure_partition(P)
        yield opened


@pytest.fixture
def story(log):
    """Ten events one second apart: offset n at T0 + n s."""
    ops = [
        create("docs", ev.FileKind.DIR), create("docs/a.txt"), ev.Write("docs/a.txt", 0, b"hello"),
        create("src", ev.FileKind.DIR), create("src/m.py"), ev.Write("src/m.py", 0, b"x" * 100),
        ev.Rename("src/m.py", "docs/m.py"), ev.Truncate("docs/a.txt", 2), ev.Unlink("docs/a.txt"),
        ev.Marker("checkpoint"),
    ]
    for n, op in enumerate(ops):
        assert append(log, P, op, T0 + n * SECOND) == n
    return log


# -- times and points --------------------------------------------------------------------

def test_time_text_round_trips_to_the_nanosecond():
    for t in (T0, T0 + 1, T0 + 123_456_789, 0, history.parse_time("0001-01-01T00:00:00Z"),
              history.parse_time("9999-12-31T23:59:59.999999999Z")):
        assert history.parse_time(history.format_time(t)) == t


@pytest.mark.parametrize("text, expected", [
    ("2026-03-01T10:00:00Z", T0),
    ("2026-03-01T12:00:00+02:00", T0),
    ("2026-03-01T10:00:00", T0),  # naive is UTC
    ("2026-03-01T10:00:00.5Z", T0 + SECOND // 2),
    ("2026-03-01T09:30:00.000000001-00:30", T0 + 1),
    ("2026-03-01 10:00:01", T0 + SECOND),
])
def test_parse_time_accepts_iso_8601_with_offsets_and_fractions(text, expected):
    assert history.parse_time(text) == expected


@pytest.mark.parametrize("text", ["yesterday", "2026-13-01T00:00:00Z", "", "12:00",
                                  "2026-03-01T10:00:00Z.5", "2026-03-01T10:00.5Z", "2026-03-01T10:00:00.5.25Z",
                                  "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])  # no year 0 or 10000 UTC
def test_parse_time_refuses_what_is_not_a_time(text):
    with pytest.raises(UsageError, match="not a time"):
        history.parse_time(text)


def test_points_are_offsets_or_times():
    assert history.parse_point("42") == Point(offset=42)
    assert history.parse_point("2026-03-01T10:00:00Z") == Point(time_ns=T0)
    for digits in ("\u00b2", "\u0663"):  # superscript two, Arabic-Indic three: not offsets
        with pytest.raises(UsageError, match="not a time"):
            history.parse_point(digits)
    assert str(Point(offset=3)) == "offset 3"
    assert str(Point(time_ns=T0)) == "time 2026-03-01T10:00:00.000000000Z"


# -- time and offset resolution --------------------------------------------------------

def test_the_state_at_a_time_includes_every_event_up_to_it(story):
    at = lambda t: history.offset_at(story, P, Point(time_ns=t))[0]  # noqa: E731
    assert at(T0 - 1) == NO_OFFSET
    assert at(T0) == 0
    assert at(T0 + 4 * SECOND) == 4
    assert at(T0 + 4 * SECOND + SECOND // 2) == 4
    assert at(T0 + 100 * SECOND) == 9
    assert history.offset_at(story, P, Point(offset=7))[0] == 7


def test_an_offset_beyond_the_end_is_refused_with_the_last_one(story):
    with pytest.raises(OutsideHistory, match="offset 10 .* the last offset is 9"):
        history.offset_at(story, P, Point(offset=10))


def test_after_retention_old_points_are_refused_and_the_message_says_how_far_back(story):
    story.truncate_before(P, 5)
    with pytest.raises(OutsideHistory) as info:
        history.offset_at(story, P, Point(offset=2))
    assert "oldest retained event: offset 5 at 2026-03-01T10:00:05" in info.value.message
    with pytest.raises(OutsideHistory, match="older than the retained history"):
        history.offset_at(story, P, Point(time_ns=T0 + 2 * SECOND))
    # Retained records alone cannot rebuild a state either: there is no base to replay on.
    with pytest.raises(OutsideHistory):
        history.offset_at(story, P, Point(offset=7))


def test_snapshots_extend_what_is_reachable(story):
    story.truncate_before(P, 5)
    anchors = [Anchor(2, T0 + 2 * SECOND), Anchor(4, T0 + 4 * SECOND)]
    # Anchor 4 is continued by the retained records 5..9: everything from 4 on is reachable.
    assert history.offset_at(story, P, Point(offset=7), anchors)[0] == 7
    assert history.offset_at(story, P, Point(offset=4), anchors)[0] == 4
    assert history.offset_at(story, P, Point(time_ns=T0 + 4 * SECOND + 1), anchors)[0] == 4
    # An older snapshot is reachable exactly at its offset, not around it.
    assert history.offset_at(story, P, Point(offset=2), anchors)[0] == 2
    with pytest.raises(OutsideHistory) as info:
        history.offset_at(story, P, Point(offset=3), anchors)
    assert "offsets from offset 4 to 9; snapshots at offsets 2" in info.value.message


def test_an_empty_history_reaches_only_the_empty_state(log):
    assert history.offset_at(log, P, Point(time_ns=T0))[0] == NO_OFFSET
    with pytest.raises(OutsideHistory, match="the history is empty"):
        history.offset_at(log, P, Point(offset=0))


# -- tail and history ranges -------------------------------------------------------------

def test_start_for_from_and_since(story):
    assert history.start_for(story, P, None) == 10
    assert history.start_for(story, P, Point(offset=3)) == 3
    assert history.start_for(story, P, Point(time_ns=T0 + 3 * SECOND)) == 3
    assert history.start_for(story, P, Point(time_ns=T0 + 3 * SECOND + 1)) == 4
    with pytest.raises(OutsideHistory):
        history.start_for(story, P, Point(offset=11))
    story.truncate_before(P, 5)
    with pytest.raises(OutsideHistory, match="dropped by retention"):
        history.start_for(story, P, Point(offset=4))
    with pytest.raises(OutsideHistory, match="dropped by retention"):
        history.start_for(story, P, Point(time_ns=T0))
    assert history.start_for(story, P, Point(time_ns=T0 + 5 * SECOND)) == 5


def test_since_a_time_still_to_come_starts_at_the_end_when_nothing_is_retained(story):
    story.truncate_before(P, 10)  # the history window emptied an idle connection's log
    assert history.start_for(story, P, Point(time_ns=time.time_ns() + 60 * SECOND)) == 10
    with pytest.raises(OutsideHistory, match="dropped by retention"):  # may be before a dropped event
        history.start_for(story, P, Point(time_ns=T0 + 9 * SECOND))


def test_between_takes_offsets_or_times_and_includes_both_ends(story):
    assert history.range_for(story, P, None) == (0, 10)
    assert history.range_for(story, P, [Point(offset=2), Point(offset=4)]) == (2, 5)
    assert history.range_for(story, P, [Point(time_ns=T0 + SECOND), Point(time_ns=T0 + 3 * SECOND)]) == (1, 4)
    assert history.range_for(story, P, [Point(offset=8), Point(offset=50)]) == (8, 10)
    with pytest.raises(UsageError, match="before"):
        history.range_for(story, P, [Point(offset=5), Point(offset=2)])


# -- reading and filtering ----------------------------------------------------------------

def test_read_returns_events_in_order_with_log_times(story):
    got = list(history.read(story, P, 0))
    assert [h.offset for h in got] == list(range(10))
    assert [h.time_ns for h in got] == [T0 + n * SECOND for n in range(10)]
    assert [h.op for h in got][:3] == ["Create", "Create", "Write"]
    assert got[5].bytes == 100
    assert [h.offset for h in history.read(story, P, 3, 6)] == [3, 4, 5]


@pytest.mark.parametrize("glob, offsets", [
    ("docs", [0, 1, 2, 6, 7, 8]),           # a directory selects what is beneath it
    ("docs/a.txt", [1, 2, 7, 8]),
    ("src/*", [4, 5, 6]),                    # the rename names src/m.py
    ("*.py", [4, 5, 6]),
    ("docs/m.py", [6]),                      # ... and docs/m.py
    ("/docs/", [0, 1, 2, 6, 7, 8]),
    ("nothing", []),
])
def test_path_globs_select_events_by_any_path_they_name(story, glob, offsets):
    assert [h.offset for h in history.read(story, P, 0, glob=glob)] == offsets


def test_summary_per_path(story):
    rows = {s.path: s for s in history.summarize(history.read(story, P, 0))}
    assert set(rows) == {"docs", "docs/a.txt", "src", "src/m.py", "docs/m.py"}
    a = rows["docs/a.txt"]
    assert (a.events, a.bytes, a.first_offset, a.last_offset, a.last_op) == (4, 5, 1, 8, "Unlink")
    assert rows["src/m.py"].bytes == 100 and rows["src/m.py"].last_op == "Rename"
    only_docs = history.summarize(history.read(story, P, 0, glob="docs"), glob="docs")
    assert [s.path for s in only_docs] == ["docs", "docs/a.txt", "docs/m.py"]


def test_a_corrupt_record_stops_reading_and_names_its_offset(story):
    corrupt_embedded(story, P, 4)
    reader = history.read(story, P, 0)
    with pytest.raises(CorruptRecord, match="offset 4"):
        list(reader)
    assert [h.offset for h in history.read(story, P, 0, 4)] == [0, 1, 2, 3]


def test_undecodable_bytes_name_their_offset(log):
    log.append(P, [b"\x02\x00 not an event"])
    with pytest.raises(CorruptRecord, match="offset 0"):
        list(history.read(log, P, 0))


def test_json_form_keeps_non_utf8_paths_exactly(log):
    raw = b"caf\xe9/na\xefve"
    name = raw.decode("utf-8", "surrogateescape")
    append(log, P, ev.Rename(name, "plain"), T0)
    (hev,) = history.read(log, P, 0)
    line = json.dumps(history.as_dict(hev), ensure_ascii=True)
    back = json.loads(line)
    assert back["paths"][0].encode("utf-8", "surrogateescape") == raw
    assert back["op"] == "Rename" and back["fields"] == {"src": name, "dst": "plain"}
    assert history.describe(hev) == "caf\\xe9/na\\xefve -> plain"


def test_human_form_names_a_task_and_how_it_ended(log):
    append(log, P, ev.TaskCommand("t7", "flush-db", ["sync"]), T0)
    append(log, P, ev.TaskResult("t7", 3, "its output", 0), T0 + SECOND)
    command, result = history.read(log, P, 0)
    assert history.describe(command) == "flush-db (task t7)"
    assert history.describe(result) == "task t7 exit 3"


def test_follow_yields_records_appended_later(log):
    import threading

    append(log, P, create("a"), T0)
    stream = history.follow(log, P, 0, glob="b*", poll_s=0.05)

    def later():
        append(log, P, create("skip-me"), T0 + 1)
        append(log, P, create("b"), T0 + 2)

    threading.Timer(0.1, later).start()
    got = next(stream)
    assert (got.offset, got.paths()) == (2, ["b"])


def test_follow_ends_once_stop_is_set(log):
    import threading

    stop = threading.Event()
    stream = history.follow(log, P, 0, poll_s=0.05, stop=stop)
    append(log, P, create("a"), T0)
    assert next(stream).paths() == ["a"]
    threading.Timer(0.1, stop.set).start()
    assert list(stream) == []  # no record came, and the generator ended


# -- dt history, on both backends ------------------------------------------------------

from history_helpers import StreamWorld, backends, dt  # noqa: E402


@pytest.fixture
def stream_world(tmp_path, backend, request):
    w = StreamWorld(tmp_path, backend, request)
    for n, op in enumerate([create("docs", ev.FileKind.DIR), create("docs/a.txt"), ev.Write("docs/a.txt", 0, b"abc"),
                            create("src/m.py"), ev.Write("src/m.py", 0, b"x" * 40), ev.Rename("src/m.py", "docs/m.py"),
                            ev.Write("docs/a.txt", 3, b"defg")]):
        w.append(op, T0 + n * SECOND)
    yield w
    w.close()


@backends()
def test_dt_history_lists_filters_and_summarises(stream_world):
    w = stream_world
    rows = [json.loads(line) for line in dt("history", "web", "--json", state=w.state).stdout.splitlines()]
    assert [r["offset"] for r in rows] == list(range(7))
    docs = [json.loads(line) for line in
            dt("history", "web", "--path", "docs", "--between", "2", "2026-03-01T10:00:05Z", "--json",
               state=w.state).stdout.splitlines()]
    assert [r["offset"] for r in docs] == [2, 5]
    human = dt("history", str(w.conn.id), "--path", "*.py", state=w.state).stdout.splitlines()
    assert [line.split()[0] for line in human] == ["3", "4", "5"]
    summary = {r["path"]: r for r in (json.loads(line) for line in dt(
        "history", "web", "--summary", "--json", state=w.state).stdout.splitlines())}
    assert summary["docs/a.txt"]["events"] == 3 and summary["docs/a.txt"]["bytes"] == 7
    assert summary["docs/a.txt"]["last_time"] == "2026-03-01T10:00:06.000000000Z"
    assert summary["docs/m.py"]["last_op"] == "Rename"
    table = dt("history", "web", "--summary", state=w.state).stdout.splitlines()
    assert table[0].split()[:3] == ["PATH", "EVENTS", "BYTES"] and len(table) == 1 + len(summary)


@backends()
def test_dt_history_bad_inputs(stream_world):
    w = stream_world
    for argv, message in [
        (("history", "ghost"), "connection not found"),
        (("history", "web", "--between", "5", "2"), "before"),
        (("history", "web", "--between", "1", "soon"), "not a time"),
        (("history", "web", "extra"), "use: dt history"),
        (("history", "export", "web"), "needs --parquet"),
        (("history", "web", "--parquet", "x.parquet"), "belongs to dt history export"),
    ]:
        done = dt(*argv, state=w.state, check=False)
        assert done.returncode == 2 and message in done.stderr, (argv, done.stderr)
    w.log.truncate_before(w.partition, 3)
    done = dt("history", "web", "--between", "2026-03-01T10:00:00Z", "6", state=w.state, check=False)
    assert done.returncode == 2 and "oldest retained event: offset 3" in done.stderr


def test_find_task_result_after_the_command_passing_over_undecodable_records(log):
    after = append(log, P, ev.TaskCommand("t1", "backup", ["true"], 0), T0)
    assert history.find_task_result(log, P, "t1", after) is None  # not run yet
    log.append(P, [b"not an event"])  # sealed by the log, but no event inside
    append(log, P, ev.TaskResult("t2", 0, "another task", after), T0 + SECOND)
    append(log, P, ev.TaskResult("t1", 3, "its output", after), T0 + 2 * SECOND)
    found = history.find_task_result(log, P, "t1", after)
    assert (found.task_id, found.exit_status, found.output) == ("t1", 3, "its output")
    assert history.find_task_result(log, P, "t1", log.end_offset(P) - 1) is None  # only after the command
    assert history.find_task_result(log, P, "t3", after) is None
