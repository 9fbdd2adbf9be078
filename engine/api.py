"""The daemon's control API: JSON lines over a Unix socket, every call authenticated.

Wire format (one JSON object per line, UTF-8 (answers: ASCII), at most ``MAX_LINE`` bytes):

- request  ``{"op": NAME, "args": {...}}``
- answer   ``{"ok": true, "result": ...}``, or
           ``{"ok": false, "error": MSGID, "message": TEXT, "exit_code": N}``

A connection carries any number of requests, answered in order; one longer than
``MAX_LINE`` is answered with an error and the connection closed (the rest of it must not
be read as a request). Operations are what the daemon registers (``Operation``): each
names the role it needs and a handler taking the ``args`` dict and returning something
JSON can encode. DtError raised by a handler becomes an error answer with its message id;
anything else is answered as an internal error (the daemon keeps serving,
engine/errors.py).

Authentication (DESIGN invariant 6, least privilege). The kernel snapshots the peer's
credentials when it connects: uid, gid and pid from ``SO_PEERCRED`` and the supplementary
groups from ``SO_PEERGROUPS`` (Linux 4.13+; ``/proc/<pid>/status`` as a fallback). Roles:

- ``ADMIN``: uid 0, or a member of group ``dtadmin``: may call every operation;
- ``MONITOR``: a member of group ``dtmonitor``: may only read state and statistics;
- ``NONE``: refused (message id DT-E016), whatever the operation.

The socket file has mode 0660 and belongs to group ``dtmonitor`` when it exists (else
``dtadmin``), so the filesystem already keeps everyone else out; administrators who are not
root are members of both groups. Peer credentials are checked anyway, on every call, so a
loosened file mode or a socket passed to another process grants nothing.

Unix socket paths are limited to 107 bytes; both sides reach a longer path through
``/proc/self/fd/<directory fd>/<name>``.
"""

from __future__ import annotations

import enum
import errno
import grp
import json
import os
import pwd
import socket
import struct
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from . import logs
from .errors import EXIT_ERROR, BackendUnavailable, DtError, NotAuthorized, UsageError

log = logs.get(__name__)

ADMIN_GROUP = "dtadmin"
MONITOR_GROUP = "dtmonitor"
SOCKET_MODE = 0o660
MAX_LINE = 1 << 20
MAX_CLIENTS = 64            # connections served at once; more wait in the listen backlog
ACCEPT_POLL_S = 0.25        # how often the accept loop notices stop()
STOP_CALLS_S = 10.0         # how long stop() waits for calls being answered
DEFAULT_TIMEOUT_S = 30.0
CONNECT_RETRY_S = 0.01      # between connects while the daemon's backlog is full
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux; Python has no name for it yet
_UNIX_PATH_MAX = 107


class Role(enum.IntEnum):
    NONE = 0
    MONITOR = 1
    ADMIN = 2


@dataclass(frozen=True)
class Peer:
    """Credentials of the process at the other end of a Unix socket (kernel-provided)."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]

    @property
    def user(self) -> str:
        try:
            return pwd.getpwuid(self.uid).pw_name
        except KeyError:
            return f"uid {self.uid}"


@dataclass(frozen=True)
class Operation:
    role: Role
    handler: Callable[[dict], Any]


class RemoteError(DtError):
    """An error answered by the daemon, re-raised in the client with the daemon's msgid."""

    template = "{message}"

    def __init__(self, msgid: str, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message=message)
        self.msgid = msgid
        self.exit_code = exit_code


# -- authentication ------------------------------------------------------------------------

def peer_of(sock: socket.socket) -> Peer:
    """The connecting process's uid, gid, pid and supplementary groups."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        struct.calcsize("3i")))
    return Peer(pid=pid, uid=uid, gid=gid, groups=_peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> tuple[int, ...]:
    for size in (4 * 256, 4 * 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
            return struct.unpack(f"{len(raw) // 4}I", raw)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            if exc.errno != errno.ENOPROTOOPT:
                raise
            break
    with open(f"/proc/{pid}/status") as status:  # kernels before 4.13
        for line in status:
            if line.startswith("Groups:"):
                return tuple(int(g) for g in line.split()[1:])
    return ()


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def role_of(peer: Peer) -> Role:
    """ADMIN for root and group dtadmin, MONITOR for group dtmonitor, else NONE."""
    if peer.uid == 0:
        return Role.ADMIN
    member_of = {peer.gid, *peer.groups}
    admin, monitor = group_id(ADMIN_GROUP), group_id(MONITOR_GROUP)
    if admin is not None and admin in member_of:
        return Role.ADMIN
    if monitor is not None and monitor in member_of:
        return Role.MONITOR
    return Role.NONE


def authorize(peer: Peer, op: str, needed: Role) -> None:
    """Raise NotAuthorized unless ``peer`` holds ``needed`` (or more)."""
    role = role_of(peer)
    if role >= needed:
        return
    if role is Role.NONE:
        reason = f"only root and members of groups {ADMIN_GROUP} or {MONITOR_GROUP} may use the daemon"
    else:
        reason = f"members of {MONITOR_GROUP} may read state and statistics; changes need group {ADMIN_GROUP}"
    raise NotAuthorized(who=f"{peer.user} (uid {peer.uid}, pid {peer.pid})", op=op, reason=reason)


# -- short socket paths ----------------------------------------------------------------------

@contextmanager
def _reachable(path: Path) -> Iterator[str]:
    """A path to ``path`` that fits in sockaddr_un (through the directory's descriptor)."""
    if len(os.fsencode(path)) <= _UNIX_PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        short = f"/proc/self/fd/{fd}/{path.name}"
        if len(short) > _UNIX_PATH_MAX:
            raise UsageError(detail=f"socket name too long: {path.name}")
        yield short
    finally:
        os.close(fd)


# -- server ------------------------------------------------------------------------------------

class ApiServer:
    """Serves ``operations`` on a Unix socket at ``path``; one thread per client connection,
    at most MAX_CLIENTS at once.

    ``stop`` waits (up to STOP_CALLS_S) for the calls being answered, so that an answer
    the daemon's shutdown made possible (the result of a ``task`` with ``wait`` that the
    drain ran) reaches its client before the process exits."""

    def __init__(self, path: str | os.PathLike, operations: dict[str, Operation]):
        self.path = Path(path)
        self.operations = operations
        self._stop = threading.Event()
        self._calls = 0                       # being answered (under _idle)
        self._slots = threading.BoundedSemaphore(MAX_CLIENTS)  # one per connection served
        self._idle = threading.Condition()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)  # a stale socket of a killed daemon (the lock is ours)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        with _reachable(self.path) as where:
            listener.bind(where)
        os.chmod(self.path, SOCKET_MODE)
        group = group_id(MONITOR_GROUP) or group_id(ADMIN_GROUP)
        if group is not None:
            os.chown(self.path, -1, group)
        listener.listen(16)
        listener.settimeout(ACCEPT_POLL_S)
        self._listener = listener
        self._thread = threading.Thread(target=self._accept_loop, name="dt-api", daemon=True)
        self._thread.start()
        log.info("control API listening", msgid="DT-D010", socket=str(self.path))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._idle:
            self._idle.wait_for(lambda: self._calls == 0, STOP_CALLS_S)
        if self._listener is not None:
            self._listener.close()
            self.path.unlink(missing_ok=True)
        log.info("control API closed", msgid="DT-D011", socket=str(self.path))

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        """Accept a connection whenever fewer than MAX_CLIENTS are served: idle clients
        without a bound would take every descriptor of the daemon, whose capture, log and
        applier then fail. Those beyond it wait in the kernel's backlog (the client tries
        again until its timeout)."""
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=ACCEPT_POLL_S):
                continue
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                self._slots.release()
                continue
            except OSError as exc:
                self._slots.release()
                log.error("control API accept failed", msgid="DT-D012", error=str(exc))
                self._stop.wait(ACCEPT_POLL_S)  # the cause (no descriptor left) lasts: no busy loop
                continue
            conn.settimeout(None)
            threading.Thread(target=self._serve, args=(conn,), name="dt-api-client", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._serve_requests(conn)
        finally:
            self._slots.release()

    def _serve_requests(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader, conn.makefile("wb") as writer:
            try:
                peer = peer_of(conn)
            except OSError as exc:
                log.error("control API could not read peer credentials", msgid="DT-D013", error=str(exc))
                return
            while not self._stop.is_set():
                line = reader.readline(MAX_LINE + 1)
                if not line:
                    return
                with self._idle:
                    self._calls += 1
                try:
                    writer.write(self._answer(peer, line))
                    writer.flush()
                except OSError:
                    return  # the client went away; nothing to tell it
                finally:
                    with self._idle:
                        self._calls -= 1
                        self._idle.notify_all()
                if len(line) > MAX_LINE:
                    return  # refused unread to its end: where the next request starts is unknown

    def _answer(self, peer: Peer, line: bytes) -> bytes:
        """The encoded answer line to one request line."""
        op = "?"
        try:
            request = _parse(line)
            op = request["op"]
            operation = self.operations.get(op)
            if operation is None:
                raise UsageError(detail=f"unknown operation {op!r} (known: {', '.join(sorted(self.operations))})")
            authorize(peer, op, operation.role)
            if operation.role is Role.ADMIN:
                log.info("control API call", msgid="DT-D014", op=op, uid=peer.uid, pid=peer.pid)
            return _encode({"ok": True, "result": operation.handler(request["args"])})
        except DtError as exc:
            if isinstance(exc, NotAuthorized):
                log.warning("control API refused a caller", msgid="DT-D015", op=op, uid=peer.uid,
                            pid=peer.pid)
            return _encode({"ok": False, **exc.as_dict(), "exit_code": exc.exit_code})
        except Exception as exc:  # noqa: BLE001 - a bug in one call must not stop the daemon
            log.exception("control API call failed", msgid="DT-D016", op=op)
            return _encode({"ok": False, "error": "DT-D016", "message": f"internal error in {op}: {exc!r}",
                            "exit_code": EXIT_ERROR})


def _encode(answer: dict) -> bytes:
    """One answer line; enums travel as their values, paths and bytes as text. ASCII JSON:
    a file name that is not UTF-8 (a str with surrogate escapes) travels as its escapes
    and comes back as the same str, where UTF-8 could not encode it."""
    return json.dumps(answer, default=_plain).encode() + b"\n"


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _parse(line: bytes) -> dict:
    if len(line) > MAX_LINE:
        raise UsageError(detail=f"request longer than {MAX_LINE} bytes")
    try:
        request = json.loads(line)
    except (ValueError, RecursionError) as exc:  # RecursionError: nested deeper than the parser goes
        raise UsageError(detail=f"request is not JSON: {exc}") from exc
    if not isinstance(request, dict) or not isinstance(request.get("op"), str):
        raise UsageError(detail='a request is {"op": NAME, "args": {...}}')
    args = request.get("args", {})
    if not isinstance(args, dict):
        raise UsageError(detail="request args must be an object")
    return {"op": request["op"], "args": args}


# -- client ------------------------------------------------------------------------------------

class ApiClient:
    """Calls a daemon's operations. Errors come back as RemoteError with the daemon's msgid."""

    def __init__(self, path: str | os.PathLike, timeout_s: float | None = DEFAULT_TIMEOUT_S):
        self.path = Path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(timeout_s)
        try:
            with _reachable(self.path) as where:
                self._connect(where, timeout_s)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            self._sock.close()
            raise BackendUnavailable(backend="daemon", detail=f"nothing listens on {self.path}") from exc
        except PermissionError as exc:
            self._sock.close()
            raise NotAuthorized(who=f"uid {os.getuid()}", op="connect to the daemon",
                                reason=f"{self.path} is only open to groups {MONITOR_GROUP} "
                                       f"(read) and {ADMIN_GROUP} (act)") from exc
        self._reader = self._sock.makefile("rb")

    def _connect(self, where: str, timeout_s: float | None) -> None:
        """connect(2) on a Unix socket with a timeout fails at once (EAGAIN) while the
        daemon's listen backlog is full, as with many clients at once: try again until
        ``timeout_s`` has passed."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                self._sock.connect(where)
                return
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    self._sock.close()
                    raise BackendUnavailable(backend="daemon", detail=f"{self.path} is too busy: not accepted "
                                                                      f"within {timeout_s} s") from None
                time.sleep(CONNECT_RETRY_S)

    def call(self, op: str, args: dict | None = None, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Any:
        """Call ``op`` with ``args``; wait at most ``timeout_s`` for the answer (None: no limit)."""
        self._sock.settimeout(timeout_s)
        try:
            self._sock.sendall(json.dumps({"op": op, "args": args or {}}).encode() + b"\n")
            line = self._reader.readline(MAX_LINE + 1)
        except socket.timeout as exc:
            raise BackendUnavailable(backend="daemon", detail=f"no answer to {op} within {timeout_s} s") from exc
        except OSError as exc:
            raise BackendUnavailable(backend="daemon", detail=f"{op}: {exc}") from exc
        if not line:
            raise BackendUnavailable(backend="daemon", detail=f"the daemon closed the connection during {op}")
        answer = json.loads(line)
        if answer.get("ok"):
            return answer.get("result")
        raise RemoteError(answer.get("error", "DT-E000"), answer.get("message", "failed"),
                          answer.get("exit_code", EXIT_ERROR))

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
