"""Control API (engine/api.py): JSON lines on a Unix socket, authenticated by peer credentials.

Authorization is tested with real processes running as other uids (os.setuid in the child)
and the real groups dtadmin and dtmonitor (created with groupadd when absent). Those
children run the system Python with a standard-library client that speaks the wire format
(the test interpreter may live where other uids cannot read).
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from datatether.engine.api import (ADMIN_GROUP, MAX_CLIENTS, MAX_LINE, MONITOR_GROUP, ApiClient, ApiServer,
                                   Operation, Peer, RemoteError, Role, peer_of, role_of)
from datatether.engine.errors import BackendUnavailable, NotFound
from datatether.engine.states import ReplicationStatus
from tests.conftest import need

OTHER_UID = 64_101  # no passwd entry needed: the kernel only knows numbers

SYSTEM_PYTHON = "/usr/bin/python3"
CLIENT = textwrap.dedent("""
    import json, socket, sys
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.connect(sys.argv[1])
    except PermissionError:
        print(json.dumps({"ok": False, "connect": "EACCES"}))
        sys.exit(0)
    sock.sendall(json.dumps({"op": sys.argv[2], "args": {}}).encode() + b"\\n")
    print(sock.makefile("rb").readline().decode())
""")


def operations(calls: list) -> dict[str, Operation]:
    def status(args):
        return {"replication_status": ReplicationStatus.REPLICATING, "echo": args.get("echo")}

    def act(args):
        calls.append(args)
        return "done"

    def missing(args):
        raise NotFound(what="connection", name="nope")

    def broken(args):
        raise RuntimeError("bug")

    return {"status": Operation(Role.MONITOR, status), "task": Operation(Role.ADMIN, act),
            "missing": Operation(Role.MONITOR, missing), "broken": Operation(Role.MONITOR, broken)}


@pytest.fixture
def shared_dir():
    """A directory other uids can traverse (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="dt-api-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(shared_dir):
    calls: list = []
    with ApiServer(shared_dir / "dt.sock", operations(calls)) as srv:
        srv.calls = calls
        yield srv


@pytest.fixture
def groups():
    need(os.geteuid() == 0, "root (to create groups and switch uid)", "run the tests as root")
    need(os.access(SYSTEM_PYTHON, os.X_OK), SYSTEM_PYTHON, "apt-get install python3")
    for name in (ADMIN_GROUP, MONITOR_GROUP):
        if not _gid(name):
            subprocess.run(["groupadd", "--system", name], check=True)
    return {name: _gid(name) for name in (ADMIN_GROUP, MONITOR_GROUP)}


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def call_as(uid: int, gids: list[int], sock: Path, op: str) -> dict:
    def become():
        os.setgroups(gids)
        os.setgid(gids[0] if gids else 65534)
        os.setuid(uid)

    out = subprocess.run([SYSTEM_PYTHON, "-c", CLIENT, str(sock), op], preexec_fn=become,
                         capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_calls_answer_results_and_errors(server):
    with ApiClient(server.path) as client:
        assert client.call("status", {"echo": "é"}) == {"replication_status": "Replicating", "echo": "é"}
        assert client.call("task", {"name": "t"}) == "done"
        with pytest.raises(RemoteError) as missing:
            client.call("missing")
        assert missing.value.msgid == NotFound.msgid and "nope" in missing.value.message
        with pytest.raises(RemoteError) as broken:
            client.call("broken")
        assert broken.value.msgid == "DT-D016" and "bug" in broken.value.message
        with pytest.raises(RemoteError) as unknown:
            client.call("format-disk")
        assert "unknown operation" in unknown.value.message
        assert client.call("status")["echo"] is None  # the connection still serves
    assert server.calls == [{"name": "t"}]


def test_a_name_that_is_not_utf8_travels_intact(server):
    """File names are bytes; one that is not UTF-8 is a str with surrogate escapes (the
    last file a status names, say): the answer must carry it, and exactly."""
    name = b"caf\xe9.txt".decode("utf-8", "surrogateescape")
    with ApiClient(server.path) as client:
        assert client.call("status", {"echo": name})["echo"] == name


def test_malformed_requests_are_answered_not_fatal(server):
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(server.path))
        reader = raw.makefile("rb")
        for line in (b"not json\n", b"[1, 2]\n", b'{"op": "status", "args": 3}\n', b"[" * 100_000 + b"\n"):
            raw.sendall(line)
            answer = json.loads(reader.readline())
            assert answer["ok"] is False and answer["error"] == "DT-E001"
        raw.sendall(b'{"op": "status"}\n')
        assert json.loads(reader.readline())["ok"] is True


def test_an_over_long_request_is_refused_and_its_rest_never_taken_for_another(server):
    smuggled = b'{"op": "task", "args": {"name": "smuggled"}}\n'
    with socket.socket(socket.AF_UNIX) as raw:
        raw.connect(str(server.path))
        raw.sendall(b"x" * (MAX_LINE + 1) + smuggled)
        reader = raw.makefile("rb")
        answer = json.loads(reader.readline())
        assert answer["ok"] is False and answer["error"] == "DT-E001" and "longer than" in answer["message"]
        assert reader.readline() == b""  # the server hung up: it cannot tell where the next request starts
    assert server.calls == []


def test_many_clients_at_once_wait_for_their_turn(server):
    """More clients than the listen backlog: a client waits for the daemon to accept it
    (connect on a Unix socket with a timeout fails at once while the backlog is full)."""
    def one(_):
        with ApiClient(server.path) as client:
            return client.call("status")["replication_status"]

    with ThreadPoolExecutor(200) as pool:
        answers = list(pool.map(one, range(400)))
    assert answers == ["Replicating"] * 400


def test_a_full_backlog_past_the_timeout_is_a_clear_error(shared_dir):
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(shared_dir / "busy.sock"))
        listener.listen(0)  # never accepted
        queued = [socket.socket(socket.AF_UNIX) for _ in range(2)]
        for sock in queued:
            sock.settimeout(0.5)
            try:
                sock.connect(str(shared_dir / "busy.sock"))
            except BlockingIOError:
                pass
        with pytest.raises(BackendUnavailable, match="too busy"):
            ApiClient(shared_dir / "busy.sock", timeout_s=0.5)
        for sock in queued:
            sock.close()


def test_clients_beyond_the_limit_wait_so_the_daemon_keeps_its_descriptors(server):
    """Idle connections must not take every descriptor of the daemon (its capture, log
    and applier need them): past MAX_CLIENTS, clients wait to be accepted."""
    before = len(os.listdir("/proc/self/fd"))
    idle, waiting, deadline = [], 0, time.monotonic() + 2
    try:
        for _ in range(MAX_CLIENTS + 50):
            sock = socket.socket(socket.AF_UNIX)
            sock.settimeout(5)
            while True:
                try:
                    sock.connect(str(server.path))
                    idle.append(sock)
                    break
                except BlockingIOError:  # the backlog is full
                    if time.monotonic() > deadline:
                        sock.close()
                        waiting += 1
                        break
                    time.sleep(0.01)
        time.sleep(0.5)  # the accept loop has caught up
        assert waiting > 0 and len(os.listdir("/proc/self/fd")) - before - len(idle) <= MAX_CLIENTS + 5
        with pytest.raises(BackendUnavailable, match="too busy"):
            ApiClient(server.path, timeout_s=0.5)
    finally:
        for sock in idle:
            sock.close()
    with ApiClient(server.path) as client:  # the idle ones left: others are served again
        assert client.call("status")["replication_status"] == "Replicating"


def test_socket_file_mode_and_group(groups, server):
    st = server.path.stat()
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert st.st_gid == groups[MONITOR_GROUP]


def test_long_socket_paths_work(shared_dir):
    deep = shared_dir / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with ApiServer(deep / "dt.sock", operations([])) as srv, ApiClient(srv.path) as client:
        assert len(str(srv.path)) > 108
        assert client.call("status")["replication_status"] == "Replicating"


def test_no_daemon_is_a_clear_error(shared_dir):
    with pytest.raises(BackendUnavailable) as err:
        ApiClient(shared_dir / "absent.sock")
    assert "nothing listens" in err.value.message


def test_peer_credentials_of_a_real_process_as_another_uid(groups):
    monitor = groups[MONITOR_GROUP]

    def become():
        os.setgroups([monitor, 4242])
        os.setgid(4343)
        os.setuid(OTHER_UID)

    with tempfile.TemporaryDirectory() as d:
        os.chmod(d, 0o711)
        path = os.path.join(d, "s")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        os.chmod(path, 0o666)
        listener.listen(1)
        proc = subprocess.Popen([SYSTEM_PYTHON, "-c",
                                 f"import socket; s=socket.socket(socket.AF_UNIX); s.connect({path!r}); s.recv(1)"],
                                preexec_fn=become, cwd="/")
        conn, _ = listener.accept()
        peer = peer_of(conn)
        conn.sendall(b"x")
        proc.wait(30)
        conn.close()
        listener.close()
    assert (peer.uid, peer.gid, peer.pid) == (OTHER_UID, 4343, proc.pid)
    assert set(peer.groups) == {monitor, 4242}
    assert role_of(peer) is Role.MONITOR


def test_roles_from_groups(groups):
    admin, monitor = groups[ADMIN_GROUP], groups[MONITOR_GROUP]
    assert role_of(Peer(1, 0, 0, ())) is Role.ADMIN
    assert role_of(Peer(1, OTHER_UID, admin, ())) is Role.ADMIN
    assert role_of(Peer(1, OTHER_UID, 4343, (monitor, admin))) is Role.ADMIN
    assert role_of(Peer(1, OTHER_UID, 4343, (monitor,))) is Role.MONITOR
    assert role_of(Peer(1, OTHER_UID, 4343, (4242,))) is Role.NONE


def test_monitor_reads_but_may_not_act(groups, server):
    gids = [groups[MONITOR_GROUP]]
    assert call_as(OTHER_UID, gids, server.path, "status")["result"]["replication_status"] == "Replicating"
    refused = call_as(OTHER_UID, gids, server.path, "task")
    assert refused["error"] == "DT-E016" and ADMIN_GROUP in refused["message"]
    assert server.calls == []


def test_admin_acts(groups, server):
    gids = [groups[MONITOR_GROUP], groups[ADMIN_GROUP]]
    assert call_as(OTHER_UID, gids, server.path, "task") == {"ok": True, "result": "done"}
    assert server.calls == [{}]


def test_others_cannot_reach_the_socket(groups, server):
    assert call_as(OTHER_UID, [4242], server.path, "status") == {"ok": False, "connect": "EACCES"}


def test_others_are_refused_even_when_the_socket_mode_is_loosened(groups, server):
    os.chmod(server.path, 0o666)
    for op in ("status", "task"):
        refused = call_as(OTHER_UID, [4242], server.path, op)
        assert refused["error"] == "DT-E016" and "may use the daemon" in refused["message"]
    assert server.calls == []
