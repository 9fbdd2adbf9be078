"""Orphans: preview, delete, move; excluded wildcards kept; age; containment."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from datatether.apply.orphans import process_orphans
from datatether.capture.scan import ScanCapture
from datatether.engine.errors import UsageError
from datatether.engine.replset import ReplicationSet
from datatether.engine.rules import parse_rule

OLD_NS = (time.time_ns() - 10 * 86400 * 10**9)


def make(root, files):
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            path.mkdir(exist_ok=True)
        else:
            path.write_text(data)


def tree(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


@pytest.fixture
def pair(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"keep.txt": "k", "dir/inner.txt": "i", "empty": None})
    make(dst, {"keep.txt": "k", "dir/inner.txt": "i", "empty": None,
               "gone.txt": "orphan", "dir/gone-too": "orphan2", "olddir/a/b.txt": "deep orphan",
               "olddir/c.txt": "c"})
    return src, dst


def run(src, dst, rules=None, **kw):
    rset = ReplicationSet(name="s", rules=tuple(rules or [parse_rule(str(src))]))
    return process_orphans(str(dst), rset, ScanCapture.of_set(rset).exists, **kw)


def test_preview_lists_orphans_and_changes_nothing(pair):
    src, dst = pair
    before = tree(dst)
    result = run(src, dst)
    assert result.paths == ["dir/gone-too", "gone.txt", "olddir/a/b.txt", "olddir/a", "olddir/c.txt", "olddir"]
    assert (result.files, result.dirs, result.bytes) == (4, 2, len("orphan") + len("orphan2") + len("deep orphan") + 1)
    assert tree(dst) == before


def test_delete_removes_exactly_the_orphans(pair):
    src, dst = pair
    result = run(src, dst, action="delete")
    assert result.count == 6 and not result.failed
    assert tree(dst) == ["dir", "dir/inner.txt", "empty", "keep.txt"]
    assert tree(src) == ["dir", "dir/inner.txt", "empty", "keep.txt"]
    assert run(src, dst).count == 0


def test_move_keeps_relative_paths_below_the_folder(pair, tmp_path):
    src, dst = pair
    moved = tmp_path / "moved"
    result = run(src, dst, action="move", move_to=str(moved))
    assert result.count == 6
    assert tree(moved) == ["dir", "dir/gone-too", "gone.txt", "olddir", "olddir/a", "olddir/a/b.txt", "olddir/c.txt"]
    assert (moved / "olddir/a/b.txt").read_text() == "deep orphan"
    assert tree(dst) == ["dir", "dir/inner.txt", "empty", "keep.txt"]


@pytest.mark.parametrize("inside", ["dst", "dst/dir", "src", "src/sub"])
def test_a_move_folder_inside_the_target_or_source_set_is_refused(pair, tmp_path, inside):
    src, dst = pair
    with pytest.raises(UsageError, match="inside"):
        run(src, dst, action="move", move_to=str(tmp_path / inside))
    assert (dst / "gone.txt").exists()


def test_a_move_folder_holding_the_target_or_source_set_is_refused(pair, tmp_path):
    """Below it an orphan's relative path could name a place in the set itself (an orphan
    ``dst/x`` moved to ``<folder>/dst/x`` would be back in the target)."""
    src, dst = pair
    make(dst, {"dst/x": "orphan", "src/x": "orphan"})
    for folder in (tmp_path, dst.parent.parent):
        with pytest.raises(UsageError, match="holds the target set"):
            run(src, dst, action="move", move_to=str(folder))
    other_src = tmp_path / "a" / "src"
    make(other_src, {"keep.txt": "k"})
    with pytest.raises(UsageError, match="holds the source set"):
        run(other_src, dst, action="move", move_to=str(tmp_path / "a"))
    assert (dst / "gone.txt").exists() and not (dst / "x").exists() and not (src / "x").exists()


def test_a_move_folder_that_is_a_file_is_refused_before_anything_moves(pair, tmp_path):
    src, dst = pair
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(UsageError, match="not a folder"):
        run(src, dst, action="move", move_to=str(tmp_path / "a-file"))
    assert (dst / "gone.txt").exists() and (tmp_path / "a-file").read_text() == "not a folder"


def test_move_across_file_systems_copies_the_objects_themselves(pair):
    src, dst = pair
    if os.stat("/dev/shm").st_dev == os.stat(dst).st_dev:
        pytest.skip("/dev/shm is on the same file system here")
    os.symlink("/etc/hostname", dst / "orphan-link")
    moved = f"/dev/shm/dt-orphans-{os.getpid()}"
    try:
        result = run(src, dst, action="move", move_to=moved)
        assert "orphan-link" in result.paths and not result.failed
        assert os.readlink(os.path.join(moved, "orphan-link")) == "/etc/hostname"
        assert open(os.path.join(moved, "gone.txt")).read() == "orphan"
        assert not (dst / "orphan-link").is_symlink()
    finally:
        shutil.rmtree(moved, ignore_errors=True)


def test_only_orphans_older_than_the_period_are_removed(pair):
    src, dst = pair
    for rel in ("gone.txt", "olddir/a/b.txt", "olddir/a", "olddir/c.txt", "olddir"):
        os.utime(dst / rel, ns=(OLD_NS, OLD_NS))
    result = run(src, dst, action="delete", older_than_s=86400)
    assert result.paths == ["gone.txt", "olddir/a/b.txt", "olddir/a", "olddir/c.txt", "olddir"]
    assert result.kept_recent == 1 and (dst / "dir/gone-too").exists()


def test_excluded_wildcards_are_not_orphans_but_files_outside_an_included_wildcard_are(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"a.db": "db", "sub/b.db": "db", "notes.txt": "not in the set"})
    make(dst, {"a.db": "db", "sub/b.db": "db", "notes.txt": "copied by hand", "old.db": "orphan",
               "cache.tmp": "excluded", "sub/more.tmp": "excluded"})
    rules = [parse_rule(f"{src}/*.db", True, True), parse_rule(f"{src}/*.tmp", False, True)]
    result = run(src, dst, rules, action="delete")
    # notes.txt exists on the source but no include rule selects it: an orphan.
    assert sorted(result.paths) == ["notes.txt", "old.db"]
    assert tree(dst) == ["a.db", "cache.tmp", "sub", "sub/b.db", "sub/more.tmp"]


def test_an_orphan_directory_holding_excluded_files_stays(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"x": "x"})
    make(dst, {"x": "x", "old/keep.tmp": "excluded", "old/drop.txt": "orphan"})
    result = run(src, dst, [parse_rule(str(src)), parse_rule(f"{src}/*.tmp", False, True)], action="delete")
    assert result.paths == ["old/drop.txt"]
    assert tree(dst) == ["old", "old/keep.tmp", "x"]


def test_symlinks_on_the_target_are_removed_never_followed(tmp_path):
    src, dst, outside = tmp_path / "src", tmp_path / "dst", tmp_path / "outside"
    make(src, {"x": "x"})
    make(outside, {"precious": "must survive", "sub/also": "must survive"})
    make(dst, {"x": "x"})
    os.symlink(outside / "precious", dst / "file-link")
    os.symlink(outside / "sub", dst / "dir-link")
    result = run(src, dst, action="delete")
    assert sorted(result.paths) == ["dir-link", "file-link"]
    assert tree(outside) == ["precious", "sub", "sub/also"]
    assert tree(dst) == ["x"]


def test_an_unknown_action_is_refused(pair):
    src, dst = pair
    with pytest.raises(UsageError):
        run(src, dst, action="shred")


def test_a_preview_lists_what_a_removal_removes_and_no_more(tmp_path):
    """An old orphan directory holding a recent orphan, or an excluded file, stays: the
    preview must not list it, and a move must not leave an empty copy of it behind."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    make(src, {"x": "x"})
    make(dst, {"x": "x", "od/recent": "new", "od/sub/old": "old", "ex/keep.tmp": "excluded", "ex/old": "old"})
    for rel in ("od/sub/old", "od/sub", "od", "ex/old", "ex"):
        os.utime(dst / rel, ns=(OLD_NS, OLD_NS))
    rules = [parse_rule(str(src)), parse_rule(f"{src}/*.tmp", False, True)]
    preview = run(src, dst, rules, older_than_s=86400)
    assert preview.paths == ["ex/old", "od/sub/old", "od/sub"] and preview.kept_recent == 1
    moved = tmp_path / "moved"
    removed = run(src, dst, rules, action="move", move_to=str(moved), older_than_s=86400)
    assert removed.paths == preview.paths and not removed.failed
    assert tree(moved) == ["ex", "ex/old", "od", "od/sub", "od/sub/old"]
    assert tree(dst) == ["ex", "ex/keep.tmp", "od", "od/recent", "x"]


def test_a_move_never_replaces_what_the_folder_holds(pair, tmp_path):
    src, dst = pair
    moved = tmp_path / "moved"
    run(src, dst, action="move", move_to=str(moved))
    make(dst, {"gone.txt": "second", "olddir/c.txt": "second c"})
    (dst / "gone.txt.1").symlink_to("nowhere")  # a taken name is never the next one either
    os.symlink("nowhere", moved / "gone.txt.1")
    result = run(src, dst, action="move", move_to=str(moved))
    assert sorted(result.paths) == ["gone.txt", "gone.txt.1", "olddir", "olddir/c.txt"] and not result.failed
    assert (moved / "gone.txt").read_text() == "orphan" and (moved / "gone.txt.2").read_text() == "second"
    assert (moved / "olddir" / "c.txt").read_text() == "c" and (moved / "olddir" / "c.txt.1").read_text() == "second c"
    assert os.readlink(moved / "gone.txt.1") == "nowhere" and os.readlink(moved / "gone.txt.1.1") == "nowhere"


def test_a_move_puts_an_orphan_directory_beside_a_file_that_took_its_name(pair, tmp_path):
    """An earlier run moved the file ``gone.txt``; now a directory of that name is an
    orphan: it and its entries go to ``gone.txt.1``, the file stays as it was."""
    src, dst = pair
    moved = tmp_path / "moved"
    run(src, dst, action="move", move_to=str(moved))
    make(dst, {"gone.txt/a": "first", "gone.txt/sub/b": "second"})
    result = run(src, dst, action="move", move_to=str(moved))
    assert not result.failed and sorted(result.paths) == ["gone.txt", "gone.txt/a", "gone.txt/sub", "gone.txt/sub/b"]
    assert (moved / "gone.txt").read_text() == "orphan"
    assert (moved / "gone.txt.1" / "a").read_text() == "first"
    assert (moved / "gone.txt.1" / "sub" / "b").read_text() == "second"
    assert not (dst / "gone.txt").exists()
