"""tools/install.sh: the control API's groups (engine/api.py) are created as root and named
to the user otherwise.

Each test runs the script's ``ensure_groups`` in a private mount namespace whose /etc is
a copy without the groups, so the machine's own groups (which other tests use) are never
touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import need

REPO = Path(__file__).resolve().parent.parent
GROUPS = ("dtadmin", "dtmonitor")
NOBODY = 65534


@pytest.fixture
def bare_etc(tmp_path):
    """A copy of /etc without the dtadmin and dtmonitor groups."""
    need(os.geteuid() == 0, "root (to mount a private /etc)", "run the tests as root")
    need(shutil.which("unshare") is not None and shutil.which("setpriv") is not None,
         "unshare and setpriv", "apt-get install util-linux")
    need(shutil.which("groupadd") is not None, "groupadd", "apt-get install passwd")
    etc = tmp_path / "etc"
    subprocess.run(["cp", "-a", "/etc", str(etc)], check=True)
    for name in ("group", "gshadow"):
        path = etc / name
        if path.exists():
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if line.split(":", 1)[0] not in GROUPS]
            path.write_text("".join(kept))
    return etc


def in_namespace(etc: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (bash, with install.sh sourced) with ``etc`` mounted over /etc."""
    inner = (f"mount --bind {etc} /etc && source {REPO}/tools/install.sh && {script}")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", inner],
                          capture_output=True, text=True, timeout=60)


def as_nobody(command: str) -> str:
    return f"setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups bash -c '{command}'"


def test_root_creates_the_system_groups_once(bare_etc):
    done = in_namespace(bare_etc, "! getent group dtadmin && ensure_groups && ensure_groups && getent group "
                                  + " ".join(GROUPS))
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("install: created group") == 2  # the second run finds them
    listed = [line.split(":") for line in done.stdout.splitlines() if not line.startswith("install:")]
    assert [entry[0] for entry in listed] == list(GROUPS)
    assert all(int(entry[2]) < 1000 for entry in listed)  # system groups
    assert all(name in (bare_etc / "group").read_text() for name in GROUPS)


def test_without_root_it_says_what_to_run_and_goes_on(bare_etc):
    done = in_namespace(bare_etc, as_nobody(f"source {REPO}/tools/install.sh && ensure_groups && echo went-on"))
    assert done.returncode == 0, done.stderr
    assert "went-on" in done.stdout
    assert "missing groups dtadmin dtmonitor" in done.stderr
    assert "groupadd --system dtadmin" in done.stderr and "groupadd --system dtmonitor" in done.stderr
    assert not any(name in (bare_etc / "group").read_text() for name in GROUPS)
