"""Verification: reports, the per-set verification log, and remirroring what differs."""

from __future__ import annotations

import os

import pytest

from datatether.engine.digest import DIGEST_BLOCK
from datatether.engine.verify import VerifyLog, log_path, verify
from datatether.tools import runtime

from test_mirror import mirror
from trees import diff_trees, make_odd_tree


@pytest.fixture
def mirrored(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make_odd_tree(src, outside=tmp_path / "outside")
    with runtime.open_state(tmp_path / "state", retry_delay_s=0.1) as state:
        mirror(state, src, dst)
        yield state, src, dst


def check(state, src, dst, **kw):
    job = runtime.adhoc_job(state, str(src), str(dst))
    if not kw.get("remirror"):
        return verify(job.source_view(), job.target_view(), state.settings, set_name=job.rset.name,
                      state_dir=state.dir, link_map=job.link_map(), **kw)

    def produce(log, locks):
        return verify(job.source_view(), job.target_view(), state.settings, set_name=job.rset.name,
                      state_dir=state.dir, event_log=log, partition=job.partition, locks=locks,
                      link_map=job.link_map(), **kw)

    return runtime.apply_while(job, produce, separate_process=False)[0]


def corrupt_in_place(path, offset=DIGEST_BLOCK + 10):
    """Change bytes and put size and times back: only a checksum comparison can tell."""
    st = os.stat(path, follow_symlinks=False)
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(4)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in old))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_a_fresh_mirror_verifies_identical_with_and_without_checksums(mirrored):
    state, src, dst = mirrored
    for checksum in (False, True):
        result = check(state, src, dst, checksum=checksum)
        assert result.identical, [d.details for d in result.differences]
        assert result.stats.objects > 50 and result.stats.problems == []
    text = open(result.log_path, encoding="utf-8", errors="surrogateescape").read()
    assert text.count("=== BEGIN verification") == 2 and text.count("result=identical") == 2


def test_a_corruption_keeping_size_and_time_is_found_by_checksum_and_repaired(mirrored):
    state, src, dst = mirrored
    target = dst / "sizes" / "one-mib-plus-one"
    corrupt_in_place(target)
    assert check(state, src, dst).identical  # size and time alone cannot see it
    found = check(state, src, dst, checksum=True)
    [diff] = found.differences
    assert diff.path == "sizes/one-mib-plus-one" and diff.aspects == ["content"] and diff.blocks == [1]
    repaired = check(state, src, dst, checksum=True, remirror=True)
    assert [d.path for d in repaired.differences] == [diff.path]  # reported as it was before
    assert repaired.stats.sent_bytes == DIGEST_BLOCK
    assert check(state, src, dst, checksum=True).identical
    assert diff_trees(src, dst) == []


def test_every_kind_of_difference_is_named(mirrored):
    state, src, dst = mirrored
    os.chmod(dst / "modes" / "setuid", 0o755)
    os.chown(dst / "owners" / "file", 0, 0)
    os.setxattr(dst / "xattrs" / "file", "user.test", b"other")
    os.unlink(dst / "-rf")
    os.unlink(dst / "links" / "dangling")
    os.symlink("elsewhere", dst / "links" / "dangling")
    os.unlink(dst / "special" / "fifo")
    (dst / "special" / "fifo").write_text("now a file")
    os.unlink(dst / "hard" / "b")
    (dst / "hard" / "b").write_bytes((src / "hard" / "b").read_bytes())
    with open(dst / "empty", "wb") as f:
        f.write(b"grown")
    result = check(state, src, dst)
    by_path = {d.path: d for d in result.differences}
    assert by_path["modes/setuid"].details == ["mode 4755 != 0755"]
    assert by_path["owners/file"].details == ["owner 1234:5678 != 0:0"]
    assert by_path["xattrs/file"].details == ["xattrs user.test"]
    assert by_path["-rf"].details == ["missing on target"]
    assert "link target 'nowhere/at/all' != 'elsewhere'" in by_path["links/dangling"].details
    assert by_path["special/fifo"].details == ["type fifo on source, file on target"]
    assert "not hard linked on target" in by_path["hard/b"].details
    assert by_path["empty"].aspects[:2] == ["size", "mtime"]
    text = open(result.log_path, encoding="utf-8", errors="surrogateescape").read()
    assert 'DIFF "-rf" (file): missing on target' in text
    assert f"different={len(result.differences)}" in text
    check(state, src, dst, remirror=True)
    assert check(state, src, dst).identical
    assert diff_trees(src, dst) == []


def test_newer_only_remirrors_only_files_newer_on_the_source(mirrored):
    state, src, dst = mirrored
    for name, delta in (("-rf", 10**9), ("--help", -10**9)):  # source newer / target newer
        (dst / name).write_text("changed on the target")
        os.utime(dst / name, ns=(1, os.stat(src / name).st_mtime_ns - delta))
    result = check(state, src, dst, newer_only=True, remirror=True)
    assert {d.path for d in result.differences} == {"-rf", "--help"}
    assert (dst / "-rf").read_bytes() == (src / "-rf").read_bytes()
    assert (dst / "--help").read_text() == "changed on the target"


def test_odd_names_are_written_to_the_log_escaped_and_byte_exact(mirrored):
    state, src, dst = mirrored
    os.unlink(dst / "new\nline")
    os.unlink(os.path.join(os.fsencode(dst), b"latin1-\xe9t\xe9-\xff"))
    result = check(state, src, dst)
    raw = open(result.log_path, "rb").read()
    assert b'DIFF "new\\nline" (file)' in raw
    assert b'DIFF "latin1-\xe9t\xe9-\xff" (file)' in raw


def test_the_log_stops_at_its_maximum_length_and_can_be_overwritten(tmp_path):
    path = tmp_path / "s verify.log"
    vlog = VerifyLog(path, max_bytes=1024, append=True)
    for i in range(100):
        vlog.line(f"line {i} " + "x" * 40)
    vlog.close()
    assert vlog.full and 1024 - 60 < path.stat().st_size <= 1024
    again = VerifyLog(path, max_bytes=1024, append=True)
    again.line("more " + "y" * 20)
    again.close()
    assert path.stat().st_size <= 1024 and b"more" not in path.read_bytes()
    fresh = VerifyLog(path, max_bytes=1024, append=False)
    fresh.line("first of a new log")
    fresh.close()
    assert path.read_text() == "first of a new log\n"


def test_after_a_line_that_does_not_fit_no_shorter_line_is_written(tmp_path):
    """A log that lost a difference must not end as if complete: once one line is cut,
    the END marker (and every later line) is left out too."""
    path = tmp_path / "s verify.log"
    vlog = VerifyLog(path, max_bytes=1024, append=False)
    vlog.line("=== BEGIN verification")
    vlog.line('DIFF "' + "n" * 1000 + '" (file): mode 0644 != 0600')
    vlog.line('DIFF "short" (file): mode 0644 != 0600')
    vlog.line("=== END verification")
    vlog.close()
    assert vlog.full and path.read_text() == "=== BEGIN verification\n"


def test_verify_log_settings_name_append_and_limit(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    for i in range(50):
        (src / f"file-{i:02d}").write_text("x")
    with runtime.open_state(tmp_path / "state", verify_log_append=False, verify_log_max_bytes=2048,
                            verify_log_name="check.log") as state:
        mirror(state, src, dst)
        for i in range(50):
            os.chmod(dst / f"file-{i:02d}", 0o600)
        job = runtime.adhoc_job(state, str(src), str(dst))
        first = check(state, src, dst)
        second = check(state, src, dst)
    path = log_path(state.dir, job.rset.name, state.settings)
    assert path.name == f"{job.rset.name} check.log" and first.log_path == second.log_path == str(path)
    text = path.read_text()
    assert text.count("=== BEGIN") == 1 and len(text.encode()) <= 2048
    assert "=== END" not in text  # the limit cut it off: lines that do not fit are not written
    assert len(second.differences) == 50  # the result itself is complete


@pytest.mark.parametrize("checksum", [False, True])
def test_names_linked_on_the_target_but_separate_on_the_source_are_found_and_split(tmp_path, checksum):
    """Writing through one of them would change the other: a difference, and a remirror
    gives the later name a file of its own (in place, even by blocks, it would not)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    (src / "sub").mkdir(parents=True)
    for name in ("a", "b", "c"):
        (src / "sub" / name).write_text("same\n")
        os.utime(src / "sub" / name, ns=(10**18, 10**18))
    with runtime.open_state(tmp_path / "state", retry_delay_s=0.1) as state:
        mirror(state, src, dst)
        os.unlink(dst / "sub" / "b")
        os.link(dst / "sub" / "a", dst / "sub" / "b")
        os.utime(dst / "sub", ns=(10**18, os.stat(src / "sub").st_mtime_ns))
        found = check(state, src, dst, checksum=checksum)
        assert [(d.path, d.aspects, d.details) for d in found.differences] == [
            ("sub/b", ["extra hard link"], ["hard linked on target to 'sub/a', a separate file on source"])]
        check(state, src, dst, checksum=checksum, remirror=True)
        assert os.stat(dst / "sub" / "a").st_nlink == os.stat(dst / "sub" / "b").st_nlink == 1
        assert check(state, src, dst, checksum=checksum).identical
        assert diff_trees(src, dst) == []
