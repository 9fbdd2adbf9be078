"""Replication sets: names, root and paths, the durable store with generations, export and
import, size on real trees (symlinks, hard links, over-long paths, block devices), overlap."""

import json
import multiprocessing
import os
import shutil
import subprocess

import pytest
from structlog.testing import capture_logs

from conftest import need
from datatether.engine import codec
from datatether.engine.errors import (AlreadyExists, CorruptRecord, InvalidName, InvalidRule, NotFound,
                                      Overlap, PathEscapes, StaleGeneration, UsageError)
from datatether.engine.events import Event
from datatether.engine.replset import (ILLEGAL_NAME_CHARS, LiveSet, ReplicationSet, SetSize, SetStore,
                                       calculate_size, check_no_overlap, overlapping_sets, walk)
from datatether.engine.rules import PATH_MAX_BYTES, parse_rule


def inc(path, recursive=True):
    return parse_rule(str(path), True, recursive)


def exc(path, recursive=True):
    return parse_rule(str(path), False, recursive)


# -- names ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ch", list(ILLEGAL_NAME_CHARS))
def test_each_illegal_character_is_refused_and_named(ch):
    with pytest.raises(InvalidName) as err:
        ReplicationSet(f"web{ch}data")
    assert f"contains {ch};" in err.value.message and err.value.msgid == "DT-E005"


def test_name_length_and_other_refusals():
    assert ReplicationSet("x" * 64).name == "x" * 64
    assert ReplicationSet("Données clients -2").name == "Données clients -2"
    for bad, reason in [("", "needs a name"), ("x" * 65, "at most 64"), ("a\nb", "control"),
                        ("a\udcffb", "UTF-8"), ("\U0001F600" * 63, "at most 250 bytes")]:
        with pytest.raises(InvalidName, match=reason):
            ReplicationSet(bad)
    with pytest.raises(InvalidName):  # never a path in the store
        SetStore("/nonexistent").get("../etc")


# -- root, relative paths, devices ---------------------------------------------------------

def test_root_is_the_deepest_common_directory_of_the_includes(tmp_path):
    s = ReplicationSet("s", (inc("/srv/www/a"), inc("/srv/www/b/*.db"), exc("/srv")))
    assert s.root == "/srv/www"
    assert ReplicationSet("s", (exc("/srv"),)).root == "/"
    (tmp_path / "only.txt").write_text("x")
    assert ReplicationSet("s", (inc(tmp_path / "only.txt"),)).root == str(tmp_path)


def test_relative_matches_answers_as_matches_does_and_stays_bounded(monkeypatch):
    from datatether.engine import replset
    s = ReplicationSet("s", (inc("/srv/www"), exc("/srv/www/*.tmp"), exc("/srv/www/cache"),
                             inc("/srv/www/cache/keep", recursive=False)))
    matches = s.relative_matches(s.root)
    cases = ["", "a.txt", "a.tmp", "cache", "cache/x", "cache/keep", "deep/er/b.tmp", "deep/er/b.txt"]
    for rel in cases * 2:  # the second round is answered from memory
        for is_dir in (False, True):
            expected = s.matches(os.path.join(s.root, rel) if rel else s.root, is_dir)
            assert matches(rel, is_dir) is expected, (rel, is_dir)
    assert matches("a.tmp", False) is False and matches("a.txt", False) is True
    monkeypatch.setattr(replset, "_REMEMBERED_ANSWERS", 4)
    bounded = s.relative_matches(s.root)
    for i in range(50):  # more names than it may remember: it starts over, answers stay right
        assert bounded(f"f{i}.tmp", False) is False and bounded(f"f{i}.txt", False) is True
    remembered = next(c.cell_contents for c in bounded.__closure__ if isinstance(c.cell_contents, dict))
    assert 0 < len(remembered) <= 4


def test_relpath_and_abspath_round_trip_and_containment():
    s = ReplicationSet("s", (inc("/srv/data"),))
    assert s.relpath("/srv/data") == "" and s.relpath("/srv/data/a/b") == "a/b"
    assert s.abspath("a/b") == "/srv/data/a/b" and s.abspath("") == s.abspath(".") == "/srv/data"
    odd = "/srv/data/caf\udce9 \n-x"  # non-UTF-8 byte, newline, leading dash survive
    assert s.abspath(s.relpath(odd)) == odd
    for outside in ["/srv/database", "/srv"]:
        with pytest.raises(PathEscapes):
            s.relpath(outside)
    for bad in ["../etc", "/etc/passwd", "a/../../x"]:
        with pytest.raises(PathEscapes):
            s.abspath(bad)


def test_with_rule_replaces_the_rule_for_the_same_path_and_without_rule_removes_it():
    s = ReplicationSet("s", (inc("/srv"),)).with_rule(exc("/srv/tmp")).with_rule(exc("/srv/tmp", False))
    assert s.rules == (inc("/srv"), exc("/srv/tmp", False))
    assert s.without_rule("/srv/tmp/").rules == (inc("/srv"),)
    with pytest.raises(NotFound):
        s.without_rule("/nowhere")
    with pytest.raises(InvalidRule, match="already has a rule"):
        ReplicationSet("s", (inc("/srv"), exc("/srv")))


def test_definition_event_carries_the_set(tmp_path):
    s = ReplicationSet("s", (inc(tmp_path), exc(tmp_path / "*.tmp")), generation=4)
    event = Event(op=s.definition(), time_ns=1)
    assert codec.decode(codec.encode(event)) == event
    assert event.op.root == str(tmp_path) and event.op.generation == 4


@pytest.fixture
def loop_device(tmp_path):
    need(os.geteuid() == 0 and shutil.which("losetup") and os.path.exists("/dev/loop-control"),
         "loop devices (root, /dev/loop-control, losetup)", "run as root; Debian package mount")
    backing = tmp_path / "disk.img"
    with open(backing, "wb") as f:
        f.truncate(3 << 20)
    dev = subprocess.run(["losetup", "-f", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_members(tmp_path, loop_device):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_bytes(b"12345")
    s = ReplicationSet("s", (inc(data), inc(loop_device, recursive=False)))
    assert s.members_devices() == [loop_device]
    assert s.root == str(data)  # the device does not drag the root up to /
    assert s.matches(loop_device, is_dir=False)
    assert calculate_size(s) == SetSize(files=2, dirs=1, bytes=5 + (3 << 20))


# -- the store -----------------------------------------------------------------------------

def test_create_get_list_save_delete_and_generations(tmp_path):
    store = SetStore(tmp_path / "state")
    a = store.create("web", [inc("/srv/www")])
    assert a.generation == 1 and store.get("web") == a
    with pytest.raises(AlreadyExists):
        store.create("web")
    b = store.save(a.with_rule(exc("/srv/www/*.tmp")))
    assert b.generation == 2 and SetStore(tmp_path / "state").get("web") == b  # durable
    store.create("db")
    assert [s.name for s in store.list()] == ["db", "web"]
    assert store.delete("db").name == "db"
    assert [s.name for s in store.list()] == ["web"]
    with pytest.raises(NotFound):
        store.get("db")
    with pytest.raises(NotFound):
        store.save(ReplicationSet("ghost", generation=1))


def test_a_stale_save_is_refused_and_changes_nothing(tmp_path):
    store = SetStore(tmp_path)
    mine = store.create("web", [inc("/srv/www")])
    theirs = store.get("web")
    store.save(theirs.with_rule(exc("/srv/www/cache")))
    with pytest.raises(StaleGeneration, match="at generation 2, not 1: it was changed by someone else"):
        store.save(mine.with_rule(inc("/srv/other")))
    with pytest.raises(StaleGeneration):
        store.save(store.get("web"), expected_generation=1)
    with pytest.raises(StaleGeneration):
        store.delete("web", expected_generation=1)
    assert store.get("web").rules == (inc("/srv/www"), exc("/srv/www/cache"))
    assert store.get("web").generation == 2


def _add_rules(state, worker, count):
    store = SetStore(state)
    for i in range(count):
        while True:
            current = store.get("shared")
            try:
                store.save(current.with_rule(inc(f"/srv/w{worker}/r{i}")))
                break
            except StaleGeneration:
                continue


def test_concurrent_writers_never_lose_an_update(tmp_path):
    SetStore(tmp_path).create("shared")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_add_rules, args=(str(tmp_path), w, 15)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    final = SetStore(tmp_path).get("shared")
    assert len(final.rules) == 45 and final.generation == 46


def test_a_damaged_record_is_reported_not_misread(tmp_path):
    store = SetStore(tmp_path)
    store.create("web", [inc("/srv/www")])
    path = tmp_path / "sets" / "web.set"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptRecord, match="web.set"):
        store.get("web")
    with pytest.raises(CorruptRecord):
        store.list()


def test_the_record_schema_documents_every_field():
    from importlib import resources
    schema = json.loads(resources.files("datatether.schemas").joinpath("replset.avsc").read_text())

    def records(node):
        if isinstance(node, dict):
            if node.get("type") == "record":
                yield node
            for v in node.values():
                yield from records(v)
        elif isinstance(node, list):
            for v in node:
                yield from records(v)
    found = list(records(schema))
    assert len(found) == 3
    for rec in found:
        assert rec.get("doc") and all(f.get("doc") for f in rec["fields"]), rec["name"]


def test_size_is_kept_with_the_generation_it_was_calculated_for(tmp_path):
    store = SetStore(tmp_path / "state")
    s = store.create("web", [inc(tmp_path / "src")])
    assert store.last_size("web") is None
    store.record_size("web", SetSize(3, 2, 100), s.generation)
    kept = store.last_size("web")
    assert kept.size == SetSize(3, 2, 100) and kept.generation == 1
    assert store.get("web").generation == 1  # recording a size is not a change of rules
    store.save(s.with_rule(exc(tmp_path / "src/x")))
    assert store.last_size("web").generation == 1  # now stale: the set is at generation 2


# -- export and import ---------------------------------------------------------------------

def test_export_import_round_trip(tmp_path):
    store = SetStore(tmp_path / "a")
    rules = [inc("/srv/www"), exc("/srv/www/*.tmp", False), inc("/srv/caf\udce9")]
    original = store.create("web", rules)
    store.export_to("web", tmp_path / "web.json")
    assert json.loads((tmp_path / "web.json").read_text())["rules"][1] == \
        {"path": "/srv/www/*.tmp", "include": False, "recursive": False}
    other = SetStore(tmp_path / "b")
    imported = other.import_from(tmp_path / "web.json")
    assert imported.rules == original.rules and imported.generation == 1
    assert other.get("web") == imported


def test_import_refuses_an_existing_name_unless_replace(tmp_path):
    store = SetStore(tmp_path)
    s = store.create("web", [inc("/srv/www")])
    s = store.save(s.with_rule(exc("/srv/www/x")))
    store.export_to("web", tmp_path / "web.json")
    store.save(s.with_rule(exc("/srv/www/y")))
    with pytest.raises(AlreadyExists):
        store.import_from(tmp_path / "web.json")
    replaced = store.import_from(tmp_path / "web.json", replace=True)
    assert replaced.generation == 4  # generations never go back
    assert [r.path for r in replaced.rules] == ["/srv/www", "/srv/www/x"]


@pytest.mark.parametrize("content, error, message", [
    ("{not json", UsageError, "not JSON"),
    ("[]", UsageError, "not a replication set export"),
    ('{"format": "datatether-replication-set", "version": 9, "name": "x", "rules": []}',
     UsageError, "unsupported export version"),
    ('{"format": "datatether-replication-set", "version": 1, "name": "x", "rules": {}}',
     UsageError, "must be a list"),
    ('{"format": "datatether-replication-set", "version": 1, "name": "x", "rules": [{"path": "/a"}]}',
     UsageError, "exactly the fields"),
    ('{"format": "datatether-replication-set", "version": 1, "name": "x", '
     '"rules": [{"path": "/a", "include": "yes", "recursive": true}]}', UsageError, "true or false"),
    ('{"format": "datatether-replication-set", "version": 1, "name": "x", "colour": 1, "rules": []}',
     UsageError, "unknown fields colour"),
    ('{"format": "datatether-replication-set", "version": 1, "name": "x", '
     '"rules": [{"path": "relative", "include": true, "recursive": true}]}', InvalidRule, "absolute"),
    ('{"format": "datatether-replication-set", "version": 1, "name": "a/b", "rules": []}',
     InvalidName, "not allowed"),
])
def test_import_validates_everything_and_stores_nothing_on_error(tmp_path, content, error, message):
    (tmp_path / "in.json").write_text(content)
    store = SetStore(tmp_path / "state")
    with pytest.raises(error, match=message):
        store.import_from(tmp_path / "in.json")
    assert store.list() == []


# -- size on a real tree -------------------------------------------------------------------

def _write(path, size):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    return size


def test_size_walks_the_rules_on_a_real_tree(tmp_path):
    src = tmp_path / "src"
    expected_bytes = _write(src / "a.txt", 1000) + _write(src / "dir/b.bin", 2500)
    expected_bytes += _write(src / "cache/keep/c", 700)
    _write(src / "cache/junk", 5000)               # excluded
    _write(src / "dir/skip.tmp", 300)               # excluded by pattern
    os.link(src / "a.txt", src / "dir/a-link.txt")   # a second name: counted once in bytes
    outside = tmp_path / "outside"
    _write(outside / "big", 9000)
    os.symlink(outside, src / "to-outside")          # not followed
    (src / "empty").mkdir()
    s = ReplicationSet("s", (inc(src), exc(src / "cache"), inc(src / "cache/keep"), exc(src / "*.tmp")))
    dirs = {".", "dir", "empty", "cache/keep"}
    files = {"a.txt", "dir/b.bin", "dir/a-link.txt", "to-outside", "cache/keep/c"}
    assert {os.path.relpath(p, src) for p, _ in walk(s)} == dirs | files
    assert calculate_size(s) == SetSize(files=len(files), dirs=len(dirs), bytes=expected_bytes)


def test_size_skips_and_logs_paths_longer_than_4094_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _write(src / "short", 10)
    # Build a chain of directories whose full path passes the limit (relative to a dir fd).
    component = "d" * 250
    fd = os.open(src, os.O_RDONLY | os.O_DIRECTORY)
    path, kept_dirs = str(src), 0
    try:
        while len(os.fsencode(path)) <= PATH_MAX_BYTES + 300:
            os.mkdir(component, dir_fd=fd)
            nfd = os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nfd
            path += "/" + component
            kept_dirs += len(os.fsencode(path)) <= PATH_MAX_BYTES
    finally:
        os.close(fd)
    with capture_logs() as logs:
        size = calculate_size(ReplicationSet("s", (inc(src),)))
    assert size == SetSize(files=1, dirs=1 + kept_dirs, bytes=10)
    assert any(e.get("msgid") == "DT-R004" for e in logs)


# -- the same data in one set only ---------------------------------------------------------

def test_overlap_detection():
    www = ReplicationSet("www", (inc("/srv/www"),))
    sub = ReplicationSet("sub", (inc("/srv/www/static"),))
    dbs = ReplicationSet("dbs", (inc("/srv/*.db"),))
    carved = ReplicationSet("carved", (inc("/srv"), exc("/srv/www"), exc("/srv/*.db")))
    other = ReplicationSet("other", (inc("/home"),))
    assert overlapping_sets(www, [www, sub, dbs, carved, other]) == ["sub", "dbs"]
    assert overlapping_sets(carved, [www, sub, dbs, other]) == []
    assert www.overlap(dbs) == "/srv/www/.db"  # a concrete path both select


def test_connecting_a_set_whose_data_another_connected_set_replicates_is_refused():
    www = ReplicationSet("www", (inc("/srv/www"),))
    logs = ReplicationSet("logs", (inc("/srv"), exc("/srv/www"), inc("/srv/www/logs")))
    with pytest.raises(Overlap) as err:
        check_no_overlap(www, [logs])
    assert "www and logs both select /srv/www/logs" in err.value.message
    check_no_overlap(www, [ReplicationSet("home", (inc("/home"),)), www])  # itself is fine


def test_a_live_set_takes_a_new_generation_but_not_a_moved_root(tmp_path):
    store = SetStore(tmp_path)
    live = LiveSet(store, store.create("web", [inc("/srv/www")]))
    assert live.reload() == "" and live.matches("cache/x", False)
    store.save(store.get("web").with_rule(exc("/srv/www/cache")))
    assert live.reload() == "replication set web changed (generation 1 -> 2)"
    assert not live.matches("cache/x", False) and live.matches("index.html", False)
    assert live.reload() == ""
    moved = store.save(store.get("web").without_rule("/srv/www").with_rule(inc("/srv/elsewhere")))
    with capture_logs() as logs:
        assert live.reload() == "" and live.reload() == ""
    assert [e["msgid"] for e in logs] == ["DT-R012"] and live.current.generation == 2 != moved.generation
