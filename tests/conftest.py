"""Shared fixtures. Services (Kafka, FUSE) are required when DT_REQUIRE_SERVICES=1
(as `make test` and CI set it): a missing one then fails the test instead of skipping it."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

REQUIRE_SERVICES = os.environ.get("DT_REQUIRE_SERVICES") == "1"
_MKFS_PACKAGES = {"ext4": "e2fsprogs", "xfs": "xfsprogs"}


def need(condition: bool, what: str, install_hint: str) -> None:
    """Skip (developer machine) or fail (CI) when a service the test needs is absent."""
    if condition:
        return
    message = f"{what} is not available; install it with: {install_hint}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (DT_REQUIRE_SERVICES=1: services are required)")
    pytest.skip(message)


@contextlib.contextmanager
def loop_filesystem(tmp_path, fstype: str, size_mb: int):
    """A fresh ``fstype`` file system of ``size_mb`` MiB on a loop device; yields its mount
    point and unmounts it after."""
    mkfs = shutil.which(f"mkfs.{fstype}")
    need(os.geteuid() == 0 and mkfs is not None, f"root and mkfs.{fstype} (loop-mounted {fstype})",
         f"tools/install.sh --test (Debian package {_MKFS_PACKAGES.get(fstype, fstype + '-progs')})")
    image, mnt = tmp_path / f"{fstype}.img", tmp_path / f"{fstype}-mnt"
    with open(image, "wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run([mkfs, "-q", str(image)], check=True, capture_output=True)
    mnt.mkdir()
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True)
    need(mounted.returncode == 0, f"loop mounts ({mounted.stderr.decode().strip()})",
         "a machine (or privileged container) where mount -o loop works")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture
def fuse_available():
    need(os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None,
         "FUSE (/dev/fuse and fusermount3)", "tools/install.sh (Debian package fuse3)")


# The session's Kafka broker (tests/kafka_fixture.py), imported here so all modules share one.
from kafka_fixture import kafka_broker  # noqa: E402,F401
