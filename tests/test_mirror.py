"""Mirror on real trees, through the real embedded log and applier (tools/runtime.py)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from structlog.testing import capture_logs

from datatether.apply.paths import remap_link
from datatether.apply.progress import Progress
from datatether.engine import mirror as mirror_mod
from datatether.engine.digest import DIGEST_BLOCK
from datatether.engine.events import FileKind
from datatether.engine.mirror import Mirror, Options, describe, differing_blocks, plan
from datatether.engine.states import MirrorMode, MirrorStatus
from datatether.engine.tree import Entry
from datatether.tools import runtime

from trees import diff_trees, make_odd_tree


@pytest.fixture
def env(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    with runtime.open_state(tmp_path / "state", retry_delay_s=0.1) as state:
        yield state, src, dst


def job_of(state, src, dst, excludes=()):
    return runtime.adhoc_job(state, str(src), str(dst), list(excludes))


def interrupted(state, job, after: int, how: str = "pause", *, separate_process: bool = False,
                made: list | None = None):
    """A full mirror of ``job`` that pauses (``how="stop"``: stops) itself once ``after``
    objects are done; ``made`` collects the Mirror."""
    def produce(log, locks):
        m = Mirror(job.source_view(), job.target_view(), log, job.partition, state.settings, locks,
                   mode=MirrorMode.FULL, position_path=job.position_path,
                   progress=lambda s: s.objects >= after and getattr(m, how)())
        if made is not None:
            made.append(m)
        return m.run()

    return runtime.apply_while(job, produce, separate_process=separate_process)


def mirror(state, src, dst, mode=MirrorMode.FULL, *, newer=False, excludes=(), **kw):
    """One mirror with the applier beside it (in a thread: quicker to start in tests; the
    CLI tests and a few here use the applier process ``dt mirror`` uses)."""
    job = job_of(state, src, dst, excludes)

    def produce(log, locks):
        m = Mirror(job.source_view(), job.target_view(), log, job.partition, state.settings, locks,
                   mode=mode, newer_only=newer, position_path=job.position_path,
                   link_map=job.link_map(), **kw)
        return m.run()

    return runtime.apply_while(job, produce, separate_process=False)


def remapped(src, dst):
    return lambda link: remap_link(link, str(src), str(dst))


def test_odd_tree_mirrors_exactly_and_a_second_diff_mirror_sends_nothing(env, tmp_path):
    state, src, dst = env
    made = make_odd_tree(src, outside=tmp_path / "outside")
    os.symlink(str(src / "hard" / "a"), src / "links" / "abs-inside")  # RemapLink rewrites it
    stats, outcome = mirror(state, src, dst)
    assert outcome.data_state == "OK" and not stats.problems
    assert diff_trees(src, dst, holes=True, link_map=remapped(src, dst)) == []
    assert os.readlink(dst / "links" / "abs-inside") == str(dst / "hard" / "a")
    # Hard links inside the set stay links; the one leaving the set is a plain file.
    assert os.stat(dst / made["hardlink_a"]).st_ino == os.stat(dst / made["hardlink_c"]).st_ino
    assert os.stat(dst / made["hardlink_outside"]).st_nlink == 1
    # The sparse file kept its holes: far less allocated than its size.
    sparse = os.stat(dst / made["sparse"])
    assert sparse.st_blocks * 512 < sparse.st_size // 4

    again, outcome = mirror(state, src, dst, MirrorMode.DIFF)
    assert (again.sent_objects, again.sent_bytes, again.differences) == (0, 0, 0)
    assert again.skipped_bytes == stats.total_bytes and outcome.data_state == "OK"


@pytest.fixture
def changed(env):
    """A mirrored tree, then four kinds of change (see the names)."""
    state, src, dst = env
    rnd = os.urandom
    for name in ("touched", "same-size-same-time", "rewritten", "target-newer", "untouched"):
        (src / name).write_bytes(rnd(5 * DIGEST_BLOCK))
    mirror(state, src, dst)
    # touched: only the time moves.
    os.utime(src / "touched", ns=(1, os.stat(src / "touched").st_mtime_ns + 10**9))
    # same-size-same-time: one block changes, size and mtime kept (what only checksums see).
    _patch(src / "same-size-same-time", 2 * DIGEST_BLOCK + 5, b"XYZ", keep_time=True)
    # rewritten: one block changes and the time moves on (newer on the source).
    _patch(src / "rewritten", 3 * DIGEST_BLOCK, b"new bytes", keep_time=False)
    os.utime(src / "rewritten", ns=(1, os.stat(src / "rewritten").st_mtime_ns + 10**9))
    # target-newer: the target's copy changed later than the source's.
    _patch(dst / "target-newer", 0, b"target side", keep_time=False)
    os.utime(dst / "target-newer", ns=(1, os.stat(dst / "target-newer").st_mtime_ns + 10**10))
    return state, src, dst


def _patch(path, offset, data, keep_time):
    st = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    if keep_time:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


FILE = 5 * DIGEST_BLOCK


@pytest.mark.parametrize("mode, newer, sent_files, sent_bytes", [
    (MirrorMode.FULL, False, {"touched", "same-size-same-time", "rewritten", "target-newer", "untouched"}, 5 * FILE),
    (MirrorMode.DIFF, False, {"touched", "rewritten", "target-newer"}, 3 * FILE),
    (MirrorMode.NEWER, True, {"touched", "rewritten"}, 2 * FILE),
    (MirrorMode.CHECKSUM, False, {"touched", "rewritten", "target-newer"}, 2 * DIGEST_BLOCK),
    (MirrorMode.CHECKSUM, True, {"touched", "rewritten"}, DIGEST_BLOCK),
    (MirrorMode.CHECKSUM_ALL, False, {"touched", "same-size-same-time", "rewritten", "target-newer"},
     3 * DIGEST_BLOCK),
])
def test_each_mode_sends_what_it_should(changed, mode, newer, sent_files, sent_bytes):
    state, src, dst = changed
    seen = []
    stats, outcome = mirror(state, src, dst, mode, newer=newer,
                            observer=lambda d: d.action != "none" and seen.append(d.path))
    assert set(seen) == sent_files
    assert stats.sent_bytes == sent_bytes
    assert stats.processed_bytes == stats.sent_bytes + stats.skipped_bytes == stats.total_bytes
    assert outcome.data_state == "OK"
    differs = {line.split("'")[1] for line in diff_trees(src, dst, compare_root=False)}
    expected_left = {"same-size-same-time", "target-newer", "untouched", "touched", "rewritten"} - sent_files
    expected_left.discard("untouched")
    assert differs == expected_left


def test_checksum_all_setting_makes_checksum_compare_every_file(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(3 * DIGEST_BLOCK))
    with runtime.open_state(tmp_path / "state", checksum_all=True) as state:
        mirror(state, src, dst)
        _patch(src / "f", DIGEST_BLOCK, b"!", keep_time=True)
        stats, _ = mirror(state, src, dst, MirrorMode.CHECKSUM)
    assert stats.sent_bytes == DIGEST_BLOCK
    assert diff_trees(src, dst) == []


def test_a_block_mirror_of_a_sparse_file_keeps_it_identical_and_cuts_a_longer_target(env):
    state, src, dst = env
    with open(src / "s", "wb") as f:
        f.write(b"a" * 100)
        f.truncate(4 << 20)
    mirror(state, src, dst)
    with open(dst / "s", "r+b") as f:  # the target grew and got data inside the hole
        f.seek(1 << 20)
        f.write(b"junk")
        f.truncate(5 << 20)
    os.utime(dst / "s", ns=(1, 2))
    stats, _ = mirror(state, src, dst, MirrorMode.CHECKSUM)
    assert stats.sent_bytes == DIGEST_BLOCK
    assert diff_trees(src, dst) == []


@pytest.mark.parametrize("mode", [MirrorMode.CHECKSUM, MirrorMode.CHECKSUM_ALL])
def test_a_block_mirror_of_a_file_grown_by_a_hole_sends_only_its_new_data_and_keeps_the_hole(env, mode):
    """Past the end of the target's file, a block that is a hole on the source is not
    sent: the final truncate makes it a hole on the target too."""
    state, src, dst = env
    (src / "s").write_bytes(b"a" * 100)
    mirror(state, src, dst)
    with open(src / "s", "r+b") as f:  # grown as databases and disk images grow
        f.truncate(8 << 20)
        f.seek(6 << 20)
        f.write(b"tail")
    stats, _ = mirror(state, src, dst, mode)
    assert stats.sent_bytes == 2 * DIGEST_BLOCK  # the first block (its length) and the tail's
    assert diff_trees(src, dst) == [] and os.stat(dst / "s").st_blocks * 512 <= 2 * DIGEST_BLOCK


# A version-2 file capability (cap_net_raw, permitted and effective), as setcap writes it.
NET_RAW_CAPABILITY = bytes.fromhex("0100000200200000000000000000000000000000")


@pytest.mark.skipif(os.geteuid() != 0, reason="setting security.capability needs root (CAP_SETFCAP)")
@pytest.mark.parametrize("mode", [MirrorMode.FULL, MirrorMode.CHECKSUM])
def test_a_file_capability_survives_the_data_written_after_it(env, mode):
    """The kernel drops a file's capability when its data is written or truncated, so the
    capability the header set must be set again after the data (small, large, sparse)."""
    state, src, dst = env
    files = {"small": b"x" * 10, "large": os.urandom(5 << 20), "sparse": None}
    for name, data in files.items():
        with open(src / name, "wb") as f:
            if data is None:
                f.truncate(1 << 20)
                f.seek(5000)
                data = b"x"
            f.write(data)
    if mode is MirrorMode.CHECKSUM:
        mirror(state, src, dst)
        for name in files:
            with open(src / name, "r+b") as f:
                f.write(b"changed")
    for name in files:
        os.chmod(src / name, 0o4755)
        os.setxattr(src / name, "security.capability", NET_RAW_CAPABILITY)
    stats, outcome = mirror(state, src, dst, mode)
    assert outcome.data_state == "OK" and not stats.problems
    assert diff_trees(src, dst, compare_root=False) == []


def test_a_small_file_travels_in_one_event_a_sparse_or_larger_one_in_a_header_data_and_end(env):
    from collections import Counter

    from datatether.engine import codec

    state, src, dst = env
    (src / "small").write_bytes(os.urandom(100_000))
    (src / "empty").write_bytes(b"")
    with open(src / "sparse", "wb") as f:  # small, but with a hole: the hole must stay one
        f.write(b"x" * 10)
        f.truncate(512 << 10)
    (src / "larger").write_bytes(os.urandom(state.settings.mirror_packet_size + 1))
    stats, outcome = mirror(state, src, dst)
    assert outcome.data_state == "OK" and not stats.problems
    assert diff_trees(src, dst, holes=True) == []
    job = job_of(state, src, dst)
    events = [codec.decode(r.value).op for r in state.log.read(job.partition, 0, max_records=1000)]
    kinds = Counter((type(op).__name__, op.path) for op in events if getattr(op, "path", ""))
    for name in ("small", "empty"):
        assert kinds[("MirrorFile", name)] == 1
        assert not kinds[("MirrorData", name)] and not kinds[("MirrorFileEnd", name)]
    one = next(op for op in events if type(op).__name__ == "MirrorFile" and op.path == "small")
    assert bytes(one.data) == (src / "small").read_bytes() and one.complete
    for name in ("sparse", "larger"):
        assert kinds[("MirrorFile", name)] == 1 and kinds[("MirrorData", name)] >= 1
        assert kinds[("MirrorFileEnd", name)] == 1


def test_excluded_names_are_not_mirrored(env):
    state, src, dst = env
    (src / "keep.txt").write_text("keep")
    (src / "skip.tmp").write_text("skip")
    (src / "sub").mkdir()
    (src / "sub" / "deep.tmp").write_text("skip")
    (src / "cache").mkdir()
    (src / "cache" / "x").write_text("skip")
    mirror(state, src, dst, excludes=["*.tmp", "cache"])
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*")) == ["keep.txt", "sub"]


def test_pause_keeps_the_position_and_resume_continues_where_it_stopped(env, monkeypatch):
    state, src, dst = env
    monkeypatch.setattr(mirror_mod, "GROUP_ITEMS", 5)
    monkeypatch.setattr(mirror_mod, "PROGRESS_EVERY_S", 0.0)
    for i in range(60):
        (src / f"f{i:02d}").write_bytes(os.urandom(1000))
    job = job_of(state, src, dst)
    runs = []

    def produce(log, locks, pause_after=None):
        m = Mirror(job.source_view(), job.target_view(), log, job.partition, state.settings, locks,
                   mode=MirrorMode.FULL, position_path=job.position_path,
                   progress=lambda s: pause_after and s.objects >= pause_after and m.pause())
        runs.append(m)
        return m.run()

    first, _ = runtime.apply_while(job, lambda log, locks: produce(log, locks, pause_after=20))
    assert first.status == MirrorStatus.PAUSED.value
    assert job.position_path.exists() and 20 <= first.sent_objects < 61
    second, outcome = runtime.apply_while(job, produce)
    assert second.resumed and second.mirror_id == first.mirror_id
    assert second.sent_objects == 61  # cumulative: nothing sent twice (60 files and the root)
    assert outcome.data_state == "OK" and not job.position_path.exists()
    assert diff_trees(src, dst) == []


def test_a_position_taken_under_other_rules_is_not_resumed(env, monkeypatch):
    """A name the paused pass excluded, now included, lies before the position: resuming
    would skip it and still end OK."""
    state, src, dst = env
    monkeypatch.setattr(mirror_mod, "GROUP_ITEMS", 2)
    monkeypatch.setattr(mirror_mod, "PROGRESS_EVERY_S", 0.0)
    for i in range(10):
        (src / f"f{i}").write_text("x")
    job = job_of(state, src, dst, excludes=["f1"])

    interrupted(state, job, 5)
    assert job.position_path.exists() and not (dst / "f1").exists()
    stats, outcome = mirror(state, src, dst, excludes=[])
    assert not stats.resumed and outcome.data_state == "OK" and diff_trees(src, dst) == []


def test_stop_forgets_the_position(env, monkeypatch):
    state, src, dst = env
    monkeypatch.setattr(mirror_mod, "GROUP_ITEMS", 5)
    monkeypatch.setattr(mirror_mod, "PROGRESS_EVERY_S", 0.0)
    for i in range(30):
        (src / f"f{i:02d}").write_bytes(b"x" * 100)
    job = job_of(state, src, dst)

    stopped, _ = interrupted(state, job, 10, "stop")
    assert stopped.status == MirrorStatus.IDLE.value and not job.position_path.exists()
    fresh, _ = mirror(state, src, dst)
    assert not fresh.resumed and fresh.mirror_id != stopped.mirror_id and fresh.sent_objects == 31


def test_a_position_of_other_options_is_not_resumed(env, monkeypatch):
    state, src, dst = env
    monkeypatch.setattr(mirror_mod, "GROUP_ITEMS", 2)
    monkeypatch.setattr(mirror_mod, "PROGRESS_EVERY_S", 0.0)
    for i in range(10):
        (src / f"f{i}").write_text("x")
    job = job_of(state, src, dst)

    interrupted(state, job, 3)
    assert job.position_path.exists()
    stats, _ = mirror(state, src, dst, MirrorMode.DIFF)
    assert not stats.resumed and diff_trees(src, dst) == []


def test_a_file_replaced_while_mirrored_is_mirrored_again_at_the_end(env):
    state, src, dst = env
    (src / "a").write_bytes(b"first version")
    (src / "big").write_bytes(os.urandom(mirror_mod.LARGE_FILE + 12345))
    replaced = set()

    def replace_once(diff):
        if diff.path in ("a", "big") and diff.path not in replaced:
            replaced.add(diff.path)
            tmp = src / f"{diff.path}.new"
            tmp.write_bytes(os.urandom(777) if diff.path == "a" else os.urandom(mirror_mod.LARGE_FILE + 99))
            os.rename(tmp, src / diff.path)

    stats, outcome = mirror(state, src, dst, observer=replace_once)
    assert replaced == {"a", "big"} and not stats.problems
    assert outcome.data_state == "OK"
    assert diff_trees(src, dst) == []


def test_a_file_that_keeps_changing_leaves_the_target_mirror_required(env):
    state, src, dst = env
    (src / "busy").write_bytes(b"v0")
    (src / "calm").write_bytes(b"calm")
    n = [0]

    def replace_always(diff):
        if diff.path == "busy":
            n[0] += 1
            tmp = src / "busy.new"
            tmp.write_bytes(f"v{n[0]}".encode())
            os.rename(tmp, src / "busy")

    stats, outcome = mirror(state, src, dst, observer=replace_always)
    assert n[0] == 2 and len(stats.problems) == 1 and "busy" in stats.problems[0]
    assert outcome.data_state == "Mirror Required"
    assert (dst / "calm").read_bytes() == b"calm"
    # The next mirror (nothing moving now) repairs it and the state returns to OK.
    again, outcome = mirror(state, src, dst, MirrorMode.DIFF)
    assert outcome.data_state == "OK" and diff_trees(src, dst) == []


def test_type_changes_on_the_target_are_replaced(env):
    state, src, dst = env
    (src / "was-dir").write_text("file now")
    (src / "was-file").mkdir()
    (src / "was-file" / "inner").write_text("x")
    os.symlink("somewhere", src / "link")
    dst.mkdir()
    (dst / "was-dir").mkdir()
    (dst / "was-dir" / "old").write_text("old")
    (dst / "was-file").write_text("old")
    os.symlink("elsewhere", dst / "link")
    mirror(state, src, dst, MirrorMode.DIFF)
    assert diff_trees(src, dst, compare_root=False) == []


@pytest.mark.parametrize("mode", [MirrorMode.DIFF, MirrorMode.CHECKSUM_ALL])
def test_a_symlink_on_the_target_where_the_source_has_a_directory_is_never_looked_through(env, tmp_path, mode):
    """The target's ``dir`` links to an outside directory holding the same ``dir/f`` as the
    source: the mirror must not take that file for the target's own (it would then leave
    the new directory empty), and the outside directory stays as it was."""
    state, src, dst = env
    (src / "dir").mkdir()
    (src / "dir" / "f").write_text("same")
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy2(src / "dir" / "f", outside / "f")
    dst.mkdir()
    os.symlink(outside, dst / "dir")
    stats, outcome = mirror(state, src, dst, mode)
    assert outcome.data_state == "OK" and not stats.problems
    assert diff_trees(src, dst, compare_root=False) == []
    assert os.listdir(outside) == ["f"] and (outside / "f").read_text() == "same"


def test_paths_longer_than_the_limit_are_skipped_reported_and_leave_mirror_required(env):
    state, src, dst = env
    fd, length = os.open(src, os.O_RDONLY), len(os.fsencode(str(src)))
    while length < 4100:  # deeper than any path syscall could take whole: built with dir fds
        os.mkdir("x" * 200, dir_fd=fd)
        child = os.open("x" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd, length = child, length + 201
    os.close(os.open("y" * 200, os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)
    (src / "fine").write_text("fine")
    with capture_logs() as logs:
        stats, outcome = mirror(state, src, dst)
    assert [e["msgid"] for e in logs].count("DT-M001") == 1  # the sizing walk leaves it to the mirror's
    assert any("longer than 4094" in p for p in stats.problems)
    assert (dst / "fine").read_text() == "fine"
    assert outcome.data_state == "Mirror Required"


def test_plan_and_describe_name_every_aspect():
    def entry(**kw):
        base = dict(rel="f", kind=FileKind.FILE, mode=0o644, uid=0, gid=0, size=10, atime_ns=1, mtime_ns=5,
                    ctime_ns=5, ino=1, dev=1, nlink=1, xattrs={})
        return Entry(**{**base, **kw})

    opts = Options(full=False, checksum=False, flag_all=False, newer_only=False)
    src = entry()
    assert plan(src, None, opts).action == "whole"
    assert plan(src, entry(kind=FileKind.DIR), opts).aspects == ["type"]
    changed = entry(size=11, mtime_ns=6, mode=0o600, uid=7, xattrs={"user.a": b"1"})
    p = plan(src, changed, opts)
    assert p.aspects == ["size", "mtime", "mode", "owner", "xattrs"] and p.action == "whole"
    assert describe(p.aspects, src, changed)[:3] == ["size 10 != 11", describe(["mtime"], src, changed)[0],
                                                     "mode 0644 != 0600"]
    newer_target = entry(mtime_ns=9, mode=0o600)
    assert plan(src, newer_target, Options(False, False, False, True)).action == "meta"
    assert plan(src, entry(mtime_ns=9), Options(False, False, False, True)).action == "none"
    assert plan(src, entry(), Options(False, True, True, False)).action == "blocks"
    # Equal size and mtime: flagged only when the source changed at or after changed_since_ns.
    assert plan(src, entry(), Options(False, True, False, False)).action == "none"
    assert plan(src, entry(), Options(False, True, False, False, changed_since_ns=5)).action == "blocks"
    assert plan(src, entry(), Options(False, True, False, False, changed_since_ns=6)).action == "none"
    assert plan(src, entry(), Options(False, False, False, False, changed_since_ns=5)).action == "whole"
    assert differing_blocks([b"a", b"b", b"c"], [b"a", b"x"]) == [1, 2]


def test_the_target_data_state_is_mirroring_while_a_mirror_is_unfinished(env, monkeypatch):
    state, src, dst = env
    monkeypatch.setattr(mirror_mod, "GROUP_ITEMS", 2)
    monkeypatch.setattr(mirror_mod, "PROGRESS_EVERY_S", 0.0)
    for i in range(6):
        (src / f"f{i}").write_text("x")
    job = job_of(state, src, dst)

    interrupted(state, job, 2, separate_process=True)
    progress = Progress(job.target_state_dir)
    try:
        assert progress.data_state.value == "Mirroring"
    finally:
        progress.close()


def test_copy_with_cp_and_mirror_agree_on_what_identical_means(env, tmp_path):
    """A tree copied by `cp -a` is found identical by a checksum-all mirror (nothing sent)."""
    state, src, dst = env
    make_odd_tree(src, outside=tmp_path / "outside")
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    stats, outcome = mirror(state, src, dst, MirrorMode.CHECKSUM_ALL)
    assert stats.sent_bytes == 0 and stats.differences == 0, stats
    assert outcome.data_state == "OK"
    shutil.rmtree(dst)


@pytest.mark.parametrize("mode", [MirrorMode.FULL, MirrorMode.CHECKSUM, MirrorMode.CHECKSUM_ALL])
def test_hard_links_survive_a_remirror_of_changed_content(env, mode):
    state, src, dst = env
    (src / "one").write_bytes(os.urandom(3 * DIGEST_BLOCK))
    os.link(src / "one", src / "two")
    (src / "sub").mkdir()
    os.link(src / "one", src / "sub" / "three")
    mirror(state, src, dst)
    _patch(src / "one", DIGEST_BLOCK, b"changed", keep_time=False)
    stats, outcome = mirror(state, src, dst, mode)
    assert outcome.data_state == "OK"
    assert diff_trees(src, dst) == []
    assert os.stat(dst / "two").st_ino == os.stat(dst / "sub" / "three").st_ino == os.stat(dst / "one").st_ino


def test_writes_captured_during_a_mirror_land_in_order_and_the_replica_ends_identical(env):
    """A capture stand-in writes the source under the path locks and appends each write,
    as capture backends do, while the mirror reads and appends the same files."""
    import random
    import threading

    from datatether.engine import codec
    from datatether.engine.events import Event, Write

    state, src, dst = env
    names = ["big", "small-a", "small-b"]
    (src / "big").write_bytes(os.urandom(3 * mirror_mod.LARGE_FILE))
    for name in names[1:]:
        (src / name).write_bytes(os.urandom(200_000))
    job = job_of(state, src, dst)
    rnd = random.Random(7)

    def capture(log, locks, stop, count):
        while not stop.is_set() or count[0] < 200:
            name = rnd.choice(names)
            size = os.path.getsize(src / name)
            offset, data = rnd.randrange(0, size - 4096), rnd.randbytes(4096)
            with locks.hold(name):
                fd = os.open(src / name, os.O_WRONLY)
                os.pwrite(fd, data, offset)
                os.close(fd)
                log.append(job.partition, [codec.encode(Event(Write(name, offset, data), 0, "test"))])
            count[0] += 1

    def produce(log, locks):
        stop, count = threading.Event(), [0]
        writer = threading.Thread(target=capture, args=(log, locks, stop, count))
        writer.start()
        try:
            m = Mirror(job.source_view(), job.target_view(), log, job.partition, state.settings, locks,
                       mode=MirrorMode.FULL, position_path=job.position_path)
            stats = m.run()
        finally:
            stop.set()
            writer.join()
        return stats, count[0]

    (stats, writes), outcome = runtime.apply_while(job, produce)
    assert writes >= 200 and outcome.data_state == "OK", (stats.problems, outcome)
    for name in names:
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name


def test_a_view_rooted_at_a_link_to_a_directory_sees_that_directory(tmp_path):
    from datatether.engine.tree import Tree

    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    os.symlink(tmp_path / "real", tmp_path / "link")
    view = Tree(tmp_path / "link")
    root, child = list(view.walk())
    assert root.kind is FileKind.DIR and child.rel == "f"
    assert view.refresh(root) is root
    os.chmod(tmp_path / "real", 0o700)
    moved = view.refresh(root)
    assert moved.kind is FileKind.DIR and moved.mode == 0o700


def test_stop_of_a_paused_mirror_forgets_its_position_at_once(env, monkeypatch):
    state, src, dst = env
    monkeypatch.setattr(mirror_mod, "GROUP_ITEMS", 2)
    monkeypatch.setattr(mirror_mod, "PROGRESS_EVERY_S", 0.0)
    for i in range(8):
        (src / f"f{i}").write_text("x")
    job = job_of(state, src, dst)
    made = []

    paused, _ = interrupted(state, job, 3, made=made)
    assert paused.status == MirrorStatus.PAUSED.value and job.position_path.exists()
    made[0].stop()
    assert not job.position_path.exists()


def test_a_checksum_block_size_other_than_the_digest_block_sends_that_granularity(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(10 * DIGEST_BLOCK + 123))
    with runtime.open_state(tmp_path / "state", checksum_block_size=4096) as state:
        mirror(state, src, dst)
        _patch(src / "f", 5 * DIGEST_BLOCK + 100, b"!", keep_time=False)
        seen = []
        stats, outcome = mirror(state, src, dst, MirrorMode.CHECKSUM, observer=seen.append)
    assert stats.sent_bytes == 4096 and seen[-1].blocks == [(5 * DIGEST_BLOCK + 100) // 4096]
    assert outcome.data_state == "OK" and diff_trees(src, dst) == []


@pytest.mark.parametrize("mode", [MirrorMode.DIFF, MirrorMode.CHECKSUM])
def test_an_owner_change_keeps_set_id_bits_and_capabilities_on_the_target(env, mode):
    """The target's chown clears set-id bits and file capabilities; the remirror of an
    owner change must leave the target with the source's mode and xattrs all the same."""
    state, src, dst = env
    prog = src / "prog"
    prog.write_bytes(b"#!/bin/sh\n")
    os.chmod(prog, 0o6755)
    cap = bytes.fromhex("0000000200200000000000000000000000000000")  # v2: cap_net_raw, permitted
    os.setxattr(prog, "security.capability", cap)
    mirror(state, src, dst)
    assert os.stat(dst / "prog").st_mode & 0o7777 == 0o6755
    os.chown(prog, 12345, 54321)  # clears the bits and the capability of the source too
    os.chmod(prog, 0o6755)
    os.setxattr(prog, "security.capability", cap)
    _, outcome = mirror(state, src, dst, mode)
    assert outcome.data_state == "OK"
    got = os.stat(dst / "prog")
    assert (got.st_mode & 0o7777, got.st_uid, got.st_gid) == (0o6755, 12345, 54321)
    assert os.getxattr(dst / "prog", "security.capability") == cap
    assert diff_trees(src, dst) == []
