"""engine/events.py: the file kinds of events and the file types of Linux map one to one."""

from __future__ import annotations

import os
import socket
import stat

from datatether.engine.events import FileKind


def test_every_file_type_has_its_kind_and_back(tmp_path):
    (tmp_path / "file").write_bytes(b"x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "symlink").symlink_to("file")
    os.mkfifo(tmp_path / "fifo")
    os.mknod(tmp_path / "char", 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
    os.mknod(tmp_path / "block", 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "socket"))
        for name, kind in (("file", FileKind.FILE), ("dir", FileKind.DIR), ("symlink", FileKind.SYMLINK),
                           ("fifo", FileKind.FIFO), ("char", FileKind.CHAR), ("block", FileKind.BLOCK),
                           ("socket", FileKind.SOCKET)):
            mode = os.lstat(tmp_path / name).st_mode
            assert FileKind.of_mode(mode) is kind, name
            assert kind.ifmt == stat.S_IFMT(mode)
    assert FileKind.of_mode(0) is None
