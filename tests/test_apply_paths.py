"""Containment: set-relative paths resolve under the target root or are refused."""

from __future__ import annotations

import os

import pytest

from datatether.apply import fsops
from datatether.apply.paths import MAX_PATH, Missing, TargetTree, inside, remap_link, split
from datatether.engine.errors import PathEscapes
from datatether.engine.events import FileKind


@pytest.mark.parametrize("bad", [
    "/etc/x", "../x", "a/../../x", "a/..", "..", "a//b", "a/", "./a", "a/./b", "a\0b",
    "x" * 256, "a/" * 2100 + "b",
])
def test_split_refuses_paths_that_are_not_canonical_and_relative(bad):
    with pytest.raises(PathEscapes):
        split(bad)


def test_split_accepts_canonical_paths_up_to_the_limit():
    assert split("") == ()
    assert split("a b/-x/\n") == ("a b", "-x", "\n")
    assert split(os.fsdecode(b"caf\xe9")) == (os.fsdecode(b"caf\xe9"),)
    longest = "/".join(["d" * 200] * 20)[:MAX_PATH].rstrip("/")
    assert len(split(longest)) == 20


def test_inside():
    assert inside("a/b", "a") and inside("a", "a") and inside("x", "")
    assert not inside("ab", "a") and not inside("a", "a/b")


@pytest.mark.parametrize("link,expected", [
    ("/src/set/a/b", "/tgt/root/a/b"),
    ("/src/set", "/tgt/root"),
    ("/src/set/", "/tgt/root"),
    ("/src/settle/x", "/src/settle/x"),          # a sibling, not inside
    ("/src/set/../etc/passwd", "/src/set/../etc/passwd"),  # leaves the set: kept verbatim
    ("../relative", "../relative"),
    ("/elsewhere", "/elsewhere"),
])
def test_remap_link(link, expected):
    assert remap_link(link, "/src/set", "/tgt/root") == expected


@pytest.fixture
def tree(tmp_path):
    t = TargetTree(tmp_path / "root")
    yield t
    t.close()


def test_locate_walks_and_creates_parents(tree, tmp_path):
    with pytest.raises(Missing):
        tree.locate("a/b/c")
    loc = tree.locate("a/b/c", create_parents=True)
    assert loc.name == "c"
    fsops.make(loc, FileKind.FILE)
    assert (tmp_path / "root/a/b/c").is_file()
    tree.release()


def test_root_only_for_attribute_operations(tree):
    with pytest.raises(PathEscapes):
        tree.locate("")
    assert tree.locate("", allow_root=True).is_root


def test_symlinked_parent_is_refused_and_nothing_is_written_outside(tree, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, tmp_path / "root/link")
    for create in (False, True):
        with pytest.raises(PathEscapes):
            tree.locate("link/x", create_parents=create)
    assert list(outside.iterdir()) == []


def test_a_file_where_a_directory_is_expected_is_missing(tree, tmp_path):
    (tmp_path / "root/f").write_text("x")
    with pytest.raises(Missing):
        tree.locate("f/x", create_parents=True)


def test_open_regular_never_goes_through_a_symlink(tree, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("keep")
    os.symlink(secret, tmp_path / "root/l")
    with pytest.raises(PathEscapes):
        fsops.open_regular(tree.locate("l"))
    os.mkfifo(tmp_path / "root/fifo")
    with pytest.raises(Missing):
        fsops.open_regular(tree.locate("fifo"))  # and did not block opening the FIFO
    assert secret.read_text() == "keep"


def test_invalidate_after_a_directory_moves(tree, tmp_path):
    loc = tree.locate("d/sub/f", create_parents=True)
    fsops.make(loc, FileKind.FILE)
    tree.release()
    os.rename(tmp_path / "root/d", tmp_path / "root/e")
    tree.invalidate("d")
    tree.release()
    with pytest.raises(Missing):
        tree.locate("d/sub/f")
    assert fsops.lstat(tree.locate("e/sub/f")) is not None


def test_descriptors_stay_valid_until_release(tmp_path):
    tree = TargetTree(tmp_path / "root", cache_size=1)
    a = tree.locate("a/x", create_parents=True)
    b = tree.locate("b/x", create_parents=True)  # over capacity: nothing closed yet
    tree.invalidate("a")
    assert fsops.lstat(a) is None and fsops.lstat(b) is None  # both descriptors still usable
    tree.release()
    tree.close()


def test_very_long_paths(tree, tmp_path):
    parts = ["p" * 250] * 16
    path = "/".join(parts)
    assert len(path) < MAX_PATH
    loc = tree.locate(path, create_parents=True)
    fsops.make(loc, FileKind.FILE)
    tree.release()
    fd = os.open(tmp_path / "root", os.O_RDONLY)
    try:
        for part in parts[:-1]:
            nfd = os.open(part, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        assert os.stat(parts[-1], dir_fd=fd).st_size == 0
    finally:
        os.close(fd)


def test_a_link_that_would_be_too_long_remapped_is_kept_as_it_is(tmp_path):
    """No filesystem stores a symlink target over 4095 bytes: the applier would retry it
    for ever, holding the queue. Kept verbatim, it is stored, and comparisons agree."""
    src = "/s"
    link = src + "/" + "q" * (4095 - len(src) - 1)
    longer = "/a-much-longer-target-root"
    assert remap_link(link, src, longer) == link
    assert remap_link(src + "/short", src, longer) == longer + "/short"
    os.symlink(remap_link(link, src, longer), tmp_path / "stored")  # fits: 4095 bytes
    assert os.readlink(tmp_path / "stored") == link
