"""`dt mirror`, `dt verify`, `dt orphans` as a user runs them: real processes, exit codes,
--json, bad input (unreadable files, a target inside the source, a full target disk)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from datatether.apply.paths import remap_link
from datatether.apply.progress import Progress

from conftest import loop_filesystem, need
from trees import diff_trees, make_odd_tree


def dt(state, *args, check_rc=None, env=None, prefix=(), cwd=None):
    proc = subprocess.run([*prefix, sys.executable, "-m", "datatether.tools", *args, "--state", str(state)],
                          capture_output=True, text=True, errors="surrogateescape", env=env, timeout=300, cwd=cwd)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def dt_json(state, *args, check_rc=0):
    return json.loads(dt(state, *args, "--json", check_rc=check_rc).stdout)


@pytest.fixture
def paths(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "config.toml").write_text("retry_delay_s = 0.2\n")
    return tmp_path / "src", tmp_path / "dst", state


def data_state(state):
    [target] = (state / "targets").iterdir()
    return Progress.read_snapshot(target)["target_data_state"]


def test_mirror_then_verify_an_odd_tree(paths, tmp_path):
    src, dst, state = paths
    make_odd_tree(src, outside=tmp_path / "outside")
    report = dt_json(state, "mirror", str(src), str(dst))
    assert report["target_data_state"] == "OK" and report["problems"] == [] and report["percent"] == 100.0
    assert diff_trees(src, dst, holes=True, link_map=lambda t: remap_link(t, str(src), str(dst))) == []
    result = dt_json(state, "verify", str(src), str(dst), "--checksum")
    assert result["identical"] and result["differences"] == []
    assert "identical" in dt(state, "verify", str(src), str(dst), check_rc=0).stdout
    again = dt_json(state, "mirror", str(src), str(dst), "--diff")
    assert again["sent_objects"] == 0 and again["connection"] == report["connection"]


def test_verify_finds_a_silent_corruption_and_remirror_repairs_it(paths):
    src, dst, state = paths
    src.mkdir()
    (src / "data.bin").write_bytes(os.urandom(300_000))
    dt(state, "mirror", str(src), str(dst), check_rc=0)
    st = os.stat(dst / "data.bin")
    with open(dst / "data.bin", "r+b") as f:
        f.seek(200_000)
        f.write(b"\0garbage\0")
    os.utime(dst / "data.bin", ns=(st.st_atime_ns, st.st_mtime_ns))
    dt(state, "verify", str(src), str(dst), check_rc=0)  # same size and time: only checksums see it
    found = dt_json(state, "verify", str(src), str(dst), "--checksum", check_rc=1)
    [diff] = found["differences"]
    assert diff["path"] == "data.bin" and diff["blocks"] == [3] and not found["identical"]
    dt(state, "verify", str(src), str(dst), "--checksum", "--remirror", check_rc=1)
    dt(state, "verify", str(src), str(dst), "--checksum", check_rc=0)
    assert (dst / "data.bin").read_bytes() == (src / "data.bin").read_bytes()
    log = next(state.glob("* verify.log")).read_text()
    assert log.count("=== BEGIN verification") == 4 and "options=checksum,remirror" in log


@pytest.mark.parametrize("flags, sent", [((), 2), (("--diff",), 1), (("--newer",), 1),
                                          (("--checksum",), 1), (("--checksum-all",), 1)])
def test_mirror_flags_choose_the_mode(paths, flags, sent):
    src, dst, state = paths
    src.mkdir()
    for name in ("a", "b"):
        (src / name).write_bytes(os.urandom(70_000))
    dt(state, "mirror", str(src), str(dst), check_rc=0)
    with open(src / "a", "r+b") as f:
        f.write(b"changed")
    report = dt_json(state, "mirror", str(src), str(dst), *flags)
    expected_mode = {(): "full", ("--diff",): "diff", ("--newer",): "newer", ("--checksum",): "checksum",
                     ("--checksum-all",): "checksum-all"}[flags]
    assert report["mode"] == expected_mode
    # full sends both files, the others only the changed one (the root is equal already).
    assert report["sent_objects"] == sent
    assert report["sent_bytes"] == (140_000 if not flags else 70_000 if "checksum" not in flags[0] else 65536)
    assert diff_trees(src, dst) == []


@pytest.mark.parametrize("flags", [("--diff", "--checksum"), ("--checksum", "--checksum-all"),
                                   ("--diff", "--checksum-all")])
def test_two_ways_of_comparing_at_once_are_refused(paths, flags):
    src, dst, state = paths
    src.mkdir()
    done = dt(state, "mirror", str(src), str(dst), *flags, check_rc=2)
    assert "not allowed with argument" in done.stderr and "[DT-E001]" in done.stderr
    assert not dst.exists()


def test_excluded_names_are_neither_mirrored_nor_orphans(paths):
    src, dst, state = paths
    src.mkdir()
    (src / "keep").write_text("k")
    (src / "scratch.tmp").write_text("t")
    dt(state, "mirror", str(src), str(dst), "--exclude", "*.tmp", check_rc=0)
    assert sorted(os.listdir(dst)) == ["keep"]
    (dst / "local.tmp").write_text("made on the target")
    (dst / "stale").write_text("gone from the source")
    preview = dt_json(state, "orphans", "preview", str(src), str(dst), "--exclude", "*.tmp", check_rc=1)
    assert preview["paths"] == ["stale"] and preview["orphans"] == 1
    dt(state, "orphans", "remove", str(src), str(dst), "--exclude", "*.tmp", check_rc=0)
    assert sorted(os.listdir(dst)) == ["keep", "local.tmp"]
    dt(state, "orphans", "preview", str(src), str(dst), "--exclude", "*.tmp", check_rc=0)


def test_later_runs_without_exclude_keep_the_pairs_excludes(paths):
    """Only an --exclude given replaces the stored ones: a verify or orphans run without
    it must neither report excluded names missing nor delete them on the target."""
    src, dst, state = paths
    (src / "ex").mkdir(parents=True)
    (src / "a").write_text("a")
    (src / "ex" / "b").write_text("b")
    (src / "c.tmp").write_text("c")
    dt(state, "mirror", str(src), str(dst), "--exclude", "ex", "--exclude", "*.tmp", check_rc=0)
    (dst / "ex").mkdir()
    (dst / "ex" / "important").write_text("kept on the target")
    (dst / "x.tmp").write_text("kept on the target")
    os.utime(dst, ns=(0, os.stat(src).st_mtime_ns))
    assert dt_json(state, "verify", str(src), str(dst))["identical"]
    [listed] = dt_json(state, "set", "list")
    assert (listed["generation"], listed["rules"]) == (1, 3)
    dt(state, "orphans", "remove", str(src), str(dst), check_rc=0)
    dt(state, "mirror", str(src), str(dst), "--diff", check_rc=0)
    assert sorted(os.listdir(dst)) == ["a", "ex", "x.tmp"] and os.listdir(dst / "ex") == ["important"]
    dt(state, "mirror", str(src), str(dst), "--exclude", "*.tmp", check_rc=0)  # given: replaces them
    assert sorted(os.listdir(dst / "ex")) == ["b", "important"]


def test_an_exclude_outside_the_source_is_refused(paths):
    src, dst, state = paths
    src.mkdir()
    for pattern in ("/etc", "../elsewhere"):
        refused = dt(state, "mirror", str(src), str(dst), "--exclude", pattern, check_rc=2)
        assert "is outside the source" in refused.stderr and "DT-E" in refused.stderr
    assert not dst.exists()
    dt(state, "mirror", str(src), str(dst), "--exclude", f"{src}/inside", check_rc=0)


def test_orphans_move_and_age(paths, tmp_path):
    src, dst, state = paths
    src.mkdir()
    (src / "keep").write_text("k")
    dt(state, "mirror", str(src), str(dst), check_rc=0)
    (dst / "old").write_text("old orphan")
    os.utime(dst / "old", (1, 1))
    (dst / "new").write_text("new orphan")
    moved = tmp_path / "moved"
    out = dt_json(state, "orphans", "remove", str(src), str(dst), "--older-than", "7d", "--move-to", str(moved))
    assert out["paths"] == ["old"] and out["kept_recent"] == 1 and (moved / "old").read_text() == "old orphan"
    bad = dt(state, "orphans", "remove", str(src), str(dst), "--move-to", str(dst / "inside"), check_rc=2)
    assert "inside the target set" in bad.stderr
    assert "bad duration" in dt(state, "orphans", "preview", str(src), str(dst), "--older-than", "soon",
                                check_rc=2).stderr


def test_an_empty_move_to_folder_is_refused_not_taken_for_a_removal(paths):
    src, dst, state = paths
    src.mkdir()
    dt(state, "mirror", str(src), str(dst), check_rc=0)
    (dst / "old").write_text("old orphan")
    os.utime(dst / "old", (1, 1))
    bad = dt(state, "orphans", "remove", str(src), str(dst), "--move-to", "", check_rc=2)
    assert "needs a folder" in bad.stderr and "DT-E001" in bad.stderr and "Traceback" not in bad.stderr
    assert (dst / "old").read_text() == "old orphan"


@pytest.mark.parametrize("command", ["mirror", "verify", "orphans"])
def test_an_empty_source_or_target_is_refused_never_taken_for_the_current_directory(paths, tmp_path, command):
    src, dst, state = paths
    src.mkdir()
    (src / "file").write_text("f")
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine").write_text("not a replica")
    os.utime(here / "mine", (1, 1))
    action = ("preview",) if command == "orphans" else ()
    for pair in ((str(src), ""), ("", str(here))):
        bad = dt(state, command, *action, *pair, check_rc=2, cwd=here)
        assert "empty" in bad.stderr and "[DT-E001]" in bad.stderr, bad.stderr
    assert sorted(os.listdir(here)) == ["mine"] and (here / "mine").read_text() == "not a replica"


def test_bad_sources_and_targets_are_refused_with_a_message(paths, tmp_path):
    src, dst, state = paths
    missing = dt(state, "mirror", str(tmp_path / "nope"), str(dst), check_rc=2)
    assert "source directory not found" in missing.stderr and "Traceback" not in missing.stderr
    src.mkdir()
    inside = dt(state, "mirror", str(src), str(src / "replica"), check_rc=2)
    assert "inside the source" in inside.stderr
    same = dt(state, "mirror", str(src), str(src), check_rc=2)
    assert "is the source itself" in same.stderr
    (tmp_path / "file").write_text("x")
    assert "not a directory" in dt(state, "mirror", str(tmp_path / "file"), str(dst), check_rc=2).stderr
    err = json.loads(dt(state, "verify", str(tmp_path / "nope"), str(dst), "--json", check_rc=2).stderr)
    assert err["error"] == "DT-E002"


def test_a_target_that_cannot_be_a_directory_is_refused_before_anything_is_recorded(paths, tmp_path):
    src, _, state = paths
    src.mkdir()
    (tmp_path / "file").write_text("x")
    for target, reason in ((tmp_path / "file", "exists and is not a directory"),
                           (tmp_path / "file" / "sub", "cannot create the target directory"),
                           (tmp_path / "file" / "sub" / "deeper", "Not a directory")):
        err = json.loads(dt(state, "mirror", str(src), str(target), "--json", check_rc=2).stderr)
        assert err["error"] == "DT-E001" and reason in err["message"] and str(target) in err["message"]
    assert not (state / "connections").exists() or not any((state / "connections").iterdir())
    assert (tmp_path / "file").read_text() == "x"
    empty = dt(state, "mirror", str(src), str(tmp_path / "dst"), "--exclude", "", check_rc=2)
    assert "empty --exclude pattern" in empty.stderr and not (tmp_path / "dst").exists()


def test_unreadable_files_are_reported_the_rest_is_mirrored_and_the_target_needs_a_mirror(paths):
    """Run without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH so root obeys file modes."""
    src, dst, state = paths
    need(shutil.which("setpriv") is not None, "setpriv", "apt-get install util-linux")
    src.mkdir()
    (src / "readable").write_text("fine")
    (src / "locked").write_text("secret")
    os.chmod(src / "locked", 0)
    (src / "closed").mkdir()
    (src / "closed" / "inner").write_text("x")
    os.chmod(src / "closed", 0)
    drop = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")
    proc = dt(state, "mirror", str(src), str(dst), check_rc=2, prefix=drop)
    assert "2 object(s) not mirrored" in proc.stderr
    assert "locked: cannot read: Permission denied" in proc.stderr and "closed: cannot list" in proc.stderr
    assert (dst / "readable").read_text() == "fine" and not (dst / "locked").exists()
    assert data_state(state) == "Mirror Required"
    verdict = dt(state, "verify", str(src), str(dst), check_rc=2, prefix=drop)
    assert "verification incomplete, 2 object(s) not compared" in verdict.stderr and "locked" in verdict.stderr
    assert "DT-E023" in verdict.stderr and re.search(r"^result\s+incomplete$", verdict.stdout, re.M)
    dt(state, "mirror", str(src), str(dst), check_rc=0)  # with full privileges it completes
    assert data_state(state) == "OK" and diff_trees(src, dst) == []


@pytest.fixture
def small_fs(tmp_path):
    """A 16 MiB ext4 file system, loop-mounted."""
    with loop_filesystem(tmp_path, "ext4", 16) as mnt:
        yield mnt


def test_a_full_target_disk_fails_clearly_leaves_mirror_required_then_recovers(paths, small_fs):
    src, _, state = paths
    dst = small_fs / "replica"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(os.urandom(1 << 20))
    ballast = small_fs / "ballast"
    with open(ballast, "wb") as f:
        f.write(b"\0" * (9 << 20))
    proc = dt(state, "mirror", str(src), str(dst), check_rc=2)
    assert "No space left on device" in proc.stderr and "Mirror Required" in proc.stderr
    assert data_state(state) == "Mirror Required"
    ballast.unlink()
    dt(state, "mirror", str(src), str(dst), check_rc=0)
    assert data_state(state) == "OK" and diff_trees(src, dst, compare_root=False) == []


def test_a_progress_bar_is_shown_on_a_terminal_only(paths):
    import fcntl
    import pty
    import struct
    import termios

    src, dst, state = paths
    src.mkdir()
    for i in range(300):
        (src / f"f{i:03d}").write_bytes(os.urandom(30_000))

    def on_terminal(*args) -> str:
        pid, fd = pty.fork()
        if pid == 0:  # the child: a terminal of 120 columns, then dt
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
            os.execv(sys.executable, [sys.executable, "-m", "datatether.tools", *args, "--state", str(state)])
        out = bytearray()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            out.extend(data)
        os.waitpid(pid, 0)
        return out.decode(errors="replace")

    shown = on_terminal("mirror", str(src), str(dst))
    assert "mirror:" in shown and "%|" in shown
    quiet = on_terminal("mirror", "--diff", "--json", str(src), str(dst))
    assert "%|" not in quiet and json.loads(quiet.strip().splitlines()[-1])["mode"] == "diff"
    assert "%|" not in dt(state, "mirror", str(src), str(dst), check_rc=0).stderr  # not a terminal


def test_orphans_are_handled_after_a_mirror_when_the_settings_ask(paths):
    src, dst, state = paths
    (state / "config.toml").write_text('orphans_action = "delete"\n')
    src.mkdir()
    (src / "keep").write_text("k")
    dst.mkdir()
    (dst / "stale").write_text("only on the target")
    report = dt_json(state, "mirror", str(src), str(dst))
    assert report["orphans"]["count"] == 1 and sorted(os.listdir(dst)) == ["keep"]
    (dst / "stale-again").write_text("x")
    verified = dt_json(state, "verify", str(src), str(dst), check_rc=1)  # the root's mtime moved
    assert [d["path"] for d in verified["differences"]] == ["."]
    assert verified["orphans"]["paths"] == ["stale-again"] and sorted(os.listdir(dst)) == ["keep"]


def test_a_state_directory_inside_the_source_is_not_mirrored(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "data").write_text("d")
    state = src / ".dt-state"
    report = dt_json(state, "mirror", str(src), str(dst))
    assert sorted(os.listdir(dst)) == ["data"] and report["problems"] == []
    dt(state, "verify", str(src), str(dst), check_rc=0)


def test_a_damaged_connection_file_is_reported_not_a_traceback(paths):
    src, dst, state = paths
    src.mkdir()
    dt(state, "mirror", str(src), str(dst), check_rc=0)
    [record] = (state / "connections").glob("*.avro")
    record.write_bytes(record.read_bytes()[:20])
    for command in (("status",), ("mirror", str(src), str(dst))):
        err = json.loads(dt(state, *command, "--json", check_rc=2).stderr)
        assert err["error"] == "DT-E007" and record.name in err["message"]


def test_an_unexpected_error_is_a_message_and_exit_2_not_a_traceback(tmp_path, monkeypatch, capsys):
    from datatether.tools import cli
    from datatether.tools.commands import status

    def broken(args):  # fault injection: it stands in for a bug, which no input produces on purpose
        raise RuntimeError("injected fault")

    monkeypatch.setattr(status, "run", broken)
    assert cli.main(["status", "--state", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "internal error" in err and "RuntimeError: injected fault" in err and "DT-E101" in err
    assert "Traceback" not in err


def test_commands_that_only_read_the_target_refuse_a_missing_one_and_record_nothing(paths):
    src, dst, state = paths
    src.mkdir()
    (src / "f").write_text("f")
    for args in (("verify",), ("verify", "--checksum"), ("orphans", "preview"), ("orphans", "remove")):
        refused = dt(state, *args, str(src), str(dst), check_rc=2)
        assert "does not exist: nothing was mirrored there" in refused.stderr and "DT-E001" in refused.stderr
    assert not dst.exists()
    assert dt_json(state, "status")["connections"] == [] and dt_json(state, "set", "list") == []
    dt(state, "verify", str(src), str(dst), "--remirror", check_rc=1)  # a remirror makes it
    assert (dst / "f").read_text() == "f"


def test_a_new_target_is_mirror_required_until_its_first_mirror_completes(paths):
    src, dst, state = paths
    src.mkdir()
    dst.mkdir()
    (dst / "stray").write_text("not a replica of anything")
    assert dt(state, "orphans", "preview", str(src), str(dst), check_rc=1)
    [conn] = dt_json(state, "status")["connections"]
    assert conn["target_data_state"] == "Mirror Required"
    dt(state, "mirror", str(src), str(dst), check_rc=0)
    [conn] = dt_json(state, "status")["connections"]
    assert conn["target_data_state"] == "OK"
