"""A live feed of one partition's appends, from the process that writes the log to a
process that reads it, so the reader gets each record as it is appended.

Why: a reader process of the embedded log learns of new records by catching up with the
writer's files (a millisecond or more per call, engine/log_embedded.py) and polling; the
daemon's applier, in a process of its own (tools/applier_process.py), must see each of
thousands of records a second within a millisecond.

- ``Feed`` is the writer's end of a SOCK_SEQPACKET socket (``Feed.pair()`` makes both
  ends). ``send(first, timestamp_ns, values)`` sends the records of one append as one
  datagram and never blocks: when the socket has no room (the reader lags or is paused) or
  the datagram would exceed ``MAX_DATAGRAM``, a short notice of the skipped offsets goes
  instead, or nothing when even that finds no room. ``attach`` swaps the socket (a new
  reader process).
- A record larger than ``CARRY_MAX`` is *announced* (its offset, in a short notice) and
  not carried: the reader reads it from the log. For a large record that is cheaper and
  off the writer's path: the embedded log reads it with one read of its segment file
  (engine/log_segments.py), where the socket costs the writer a copy into the socket and
  the reader two more (out of it, then into the record), for every captured 1 MiB write.
  Records up to ``CARRY_MAX`` (small writes, metadata, control records) are carried: for
  them the feed's point is latency, and a log read costs a catch-up.
- ``FeedingLog(inner, partition, feed)`` wraps the writer's Log: after an append to
  ``partition`` returned (the records are durable), it sends them. The appends of the
  partition must come from one thread at a time (engine/queue.py appends under its lock),
  so datagrams arrive in offset order.
- ``FedLog(inner, partition, sock)`` wraps the reader's Log: ``read`` and ``wait`` serve
  records from the feed when it has them and from ``inner`` otherwise (offsets appended
  before the feed existed, skipped ones, or everything once the writer is gone). The feed
  only makes records arrive sooner; the log stays the truth, so a lost datagram costs
  time, never a record. The writer's end must be attached before the reader is made:
  the reader takes the log's end then, and afterwards asks the log only for what the feed
  announced without bringing (a read past everything announced returns ``[]``; reading
  the log costs a catch-up of a millisecond or more). Other calls go to ``inner``.

A fed record is the payload the writer appended, handed over in memory (the log sealed
and stored it; the socket cannot damage it), with the timestamp the writer asked for (the
log may have raised it to keep timestamps monotonic). ``FedLog`` holds at most
``BUFFER_BYTES`` of records ahead of the reader; beyond that the datagrams wait in the
socket, and once it is full the writer skips.

Datagram (little-endian): kind ``b"R"`` (records), ``b"S"`` (skipped) or ``b"A"``
(announced), first offset (int64), timestamp or count (int64), record count n (uint32),
then for ``b"R"`` n sizes (uint32) and the n payloads.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
from collections import deque
from typing import Sequence

from . import logs
from .log import DEFAULT_READ_BYTES, DEFAULT_READ_RECORDS, Log, LogRecord

log = logs.get(__name__)

MAX_DATAGRAM = 4 << 20
CARRY_MAX = 64 << 10      # larger records are announced, and read from the log
SOCKET_BYTES = 64 << 20   # the writer's socket buffer (asked for; an unprivileged writer gets less)
BUFFER_BYTES = 64 << 20
_HEAD = struct.Struct("<cqqI")
_RECORDS, _SKIPPED, _ANNOUNCED = b"R", b"S", b"A"
_JOIN_ABOVE = 64          # records per datagram sent as separate buffers (IOV_MAX is 1024)


class Feed:
    """The writer's end of the feed socket (see the module docstring)."""

    def __init__(self, sock: socket.socket | None = None):
        self._sock = self._retired = None
        self.skipped = 0  # records not fed (counted for tests and diagnosis)
        if sock is not None:
            self.attach(sock)

    @staticmethod
    def pair() -> tuple[socket.socket, socket.socket]:
        """(writer end, reader end), the writer's buffer as large as allowed."""
        writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for option in (getattr(socket, "SO_SNDBUFFORCE", 32), socket.SO_SNDBUF):
            try:
                writer.setsockopt(socket.SOL_SOCKET, option, SOCKET_BYTES)
                break
            except OSError:  # SO_SNDBUFFORCE needs CAP_NET_ADMIN; SO_SNDBUF is capped
                continue
        writer.setblocking(False)
        return writer, reader

    def attach(self, sock: socket.socket | None) -> None:
        """Feed ``sock`` from now on (None: feed nothing). The socket it replaces is closed
        at the next ``attach`` or ``close``, not now: a ``send`` may still be using it, and
        its descriptor number must not be reused under that send."""
        retired, self._retired = self._retired, self._sock
        self._sock = sock
        if retired is not None:
            retired.close()

    def send(self, first: int, timestamp_ns: int, values: Sequence[bytes]) -> None:
        """Feed the records of one append: runs of carried ones, runs of announced ones."""
        sock = self._sock
        if sock is None or not values:
            return
        start = 0
        for end in range(1, len(values) + 1):
            if end == len(values) or (len(values[end]) > CARRY_MAX) != (len(values[start]) > CARRY_MAX):
                if len(values[start]) > CARRY_MAX:
                    self._announce(sock, first + start, end - start)
                else:
                    self._carry(sock, first + start, timestamp_ns, values[start:end])
                start = end

    def _carry(self, sock: socket.socket, first: int, timestamp_ns: int, values: Sequence[bytes]) -> None:
        sizes = [len(v) for v in values]
        head = _HEAD.pack(_RECORDS, first, timestamp_ns, len(values)) + struct.pack(f"<{len(values)}I", *sizes)
        if len(head) + sum(sizes) <= MAX_DATAGRAM:
            body = list(values) if len(values) <= _JOIN_ABOVE else [b"".join(values)]
            if self._try(sock, [head, *body]):
                return
        self.skipped += len(values)
        self._try(sock, [_HEAD.pack(_SKIPPED, first, len(values), 0)])

    def _announce(self, sock: socket.socket, first: int, count: int) -> None:
        if not self._try(sock, [_HEAD.pack(_ANNOUNCED, first, count, 0)]):
            self.skipped += count  # no room even for the notice: found later, as a lost skip notice's are

    @staticmethod
    def _try(sock: socket.socket, buffers: list[bytes]) -> bool:
        try:
            sock.sendmsg(buffers)
            return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:  # the reader is gone (or its socket was swapped meanwhile)
            return False

    def close(self) -> None:
        self.attach(None)
        self.attach(None)


class FeedingLog:
    """A Log whose appends to ``partition`` are fed (see the module docstring)."""

    def __init__(self, inner: Log, partition: str, feed: Feed):
        self._inner = inner
        self._partition = partition
        self.feed = feed

    def append(self, partition: str, values: Sequence[bytes], timestamp_ns: int | None = None) -> int:
        stamp = time.time_ns() if timestamp_ns is None else timestamp_ns
        first = self._inner.append(partition, values, stamp)
        if partition == self._partition:
            self.feed.send(first, stamp, values)
        return first

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


class FedLog:
    """A reader's Log that takes ``partition``'s records from the feed when it has them."""

    def __init__(self, inner: Log, partition: str, sock: socket.socket):
        self._inner = inner
        self._partition = partition
        self._sock = sock
        self._sock.setblocking(False)
        self._buf = bytearray(MAX_DATAGRAM + _HEAD.size)
        self._view = memoryview(self._buf)
        self._records: deque[LogRecord] = deque()  # in offset order, not always consecutive
        self._bytes = 0
        # The highest offset known to exist: the log's end when the feed was already
        # attached (``Feed.attach`` comes before the reader is made), then what the feed
        # announces (fed or skipped).
        self._seen = inner.end_offset(partition) - 1
        self._open = True        # False once the writer closed its end
        self._lagged = False     # the writer skipped records since the log was last asked
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # -- the Log calls the feed serves -------------------------------------------------

    def read(self, partition: str, start: int, max_records: int = DEFAULT_READ_RECORDS,
             max_bytes: int = DEFAULT_READ_BYTES) -> list[LogRecord]:
        if partition != self._partition:
            return self._inner.read(partition, start, max_records, max_bytes)
        self._forget_below(start)
        self._pump()
        records, total = [], 0
        for record in self._records:
            if (record.offset != start + len(records) or len(records) >= max(1, max_records)
                    or (records and total + len(record.value) > max_bytes)):
                break
            records.append(record)
            total += len(record.value)
            if total >= max_bytes:
                break
        if records or (self._open and not self._lagged and start > self._seen):
            return records  # nothing was appended there yet: no need to ask the log
        return self._inner.read(partition, start, max_records, max_bytes)

    def wait(self, partition: str, offset: int, timeout_s: float) -> bool:
        """True once ``offset`` exists: fed, announced as skipped, or in ``inner``, which is
        asked once after the writer skipped records (when the socket had no room even for
        the notice, later ones go unannounced) and at the timeout. ``wake()`` ends the
        wait early."""
        if partition != self._partition:
            return self._inner.wait(partition, offset, timeout_s)
        deadline = time.monotonic() + timeout_s
        while True:
            self._pump()
            if offset <= self._seen or self._bytes >= BUFFER_BYTES:
                return True  # (a full buffer: what it holds must be read first)
            if self._lagged:  # skipped records may be followed by unannounced ones
                self._lagged = False
                if self._in_log(offset):
                    return True
            remaining = deadline - time.monotonic()
            if not self._open:
                return self._inner.wait(partition, offset, max(0.0, remaining))
            if remaining <= 0:
                return self._in_log(offset)
            ready, _, _ = select.select([self._sock, self._wake_r], [], [], remaining)
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
                return offset <= self._seen

    def _in_log(self, offset: int) -> bool:
        """Does the log (asked directly: a catch-up) hold ``offset``? What it holds counts
        as announced, so ``read`` asks the log for it."""
        self._seen = max(self._seen, self._inner.end_offset(self._partition) - 1)
        return offset <= self._seen

    def wake(self) -> None:
        """End a ``wait`` in progress (from another thread)."""
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass

    def close(self) -> None:
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._inner.close()

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    # -- the feed --------------------------------------------------------------------------

    def _forget_below(self, start: int) -> None:
        while self._records and self._records[0].offset < start:
            self._bytes -= len(self._records.popleft().value)

    def _pump(self) -> None:
        """Take the datagrams waiting in the socket while the buffer has room."""
        while self._open and self._bytes < BUFFER_BYTES:
            try:
                size = self._sock.recv_into(self._buf, len(self._buf), socket.MSG_TRUNC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._open = False
                return
            if size == 0:
                self._open = False  # the writer closed its end: the log alone from now on
                return
            self._take(size)

    def _take(self, size: int) -> None:
        kind, first, stamp, count = _HEAD.unpack_from(self._buf)
        if kind == _ANNOUNCED:  # they exist: ``read`` takes them from the log
            self._seen = max(self._seen, first + stamp - 1)
            return
        if kind == _SKIPPED:
            self._seen = max(self._seen, first + stamp - 1)
            self._lagged = True
            return
        self._seen = max(self._seen, first + count - 1)
        if size > len(self._buf):
            self._lagged = True
            return  # cut short: read from the log like a skipped range
        pos = _HEAD.size + 4 * count
        sizes = struct.unpack_from(f"<{count}I", self._buf, _HEAD.size)
        last = self._records[-1].offset if self._records else -1
        for offset, length in enumerate(sizes, first):
            if offset > last:  # never out of order (the writer appends in order; be sure)
                self._records.append(LogRecord(offset, stamp, bytes(self._view[pos:pos + length])))
                self._bytes += length
            pos += length
