"""The embedded ``Log`` backend: every partition in one RocksDB directory (rocksdict).

It implements the contract of engine/log.py; this docstring adds what is specific to it.

On-disk layout (raw keys and values, integers big-endian signed 64-bit)
-----------------------------------------------------------------------
``<name>`` is the partition name in ASCII. Names never contain NUL (engine/log.py), so
``<name> 0x00`` is a prefix no other partition's keys share, and a partition's keys form
the range ``[<name> 0x00, <name> 0x01)``. Offsets are fixed-width, so byte order is
offset order and one iterator walks a partition in offset order.

=============  ==========================  =============================================
column family  key                         value
=============  ==========================  =============================================
default        ``b"format"``               ``b"1"`` (layout version)
partitions     ``<name>``                  start, end, appended bytes, last timestamp
records        ``<name> 0x00 <offset>``    ``frame.seal(<timestamp> + <payload>)``
index          ``<name> 0x00 <offset>``    timestamp, payload bytes appended before it
consumers      ``<name> 0x00 <consumer>``  committed offset
=============  ==========================  =============================================

- The seal covers the timestamp with the payload, so neither can be damaged unnoticed.
- ``index`` serves ``offset_for_time`` (binary search: timestamps never decrease within a
  partition, an append whose timestamp is older than the previous record's takes the
  previous one, so a clock stepping back cannot break time lookups) and ``size`` (retained
  bytes = appended bytes - bytes appended before ``start``) without reading records.
- Sizes count payload bytes, the ``len(value)`` a reader gets back.
- One ``append`` is one WriteBatch (records, index entries and the partition's end), so a
  batch is all there or absent after a crash. ``truncate_before`` and ``drop_partition``
  are DeleteRange tombstones in one batch with the new metadata.
- RocksDB reports every failure as a plain Exception; callers get the log's errors
  (``_failure``). A full disk or an I/O error is BackendUnavailable (after a failed write
  RocksDB refuses every write until the log is opened again; ``close`` releases the
  directory even then). RocksDB checksums its blocks too: a block failing its check is
  CorruptRecord wherever it is met (a lookup, a scan), never an absent key. A scan that
  stops short at a damaged block (rocksdict's ``items`` ends quietly there) must not pass
  for a complete one: the partition table read short would make partitions look dropped,
  their segments deleted and their offsets given out again; consumers read short would
  free records for retention.
  ``read`` needs no such check: a record missing below the partition's end is corruption.

Concurrency and durability
--------------------------
One process opens the directory for writing (RocksDB's lock file enforces it); inside it,
any thread may call any method. A lock per partition serialises offset assignment; reads
take no lock (an iterator is a consistent snapshot). The write-ahead log is always on: a
write returned by ``append``/``commit`` is in the operating system's hands and survives
the process being killed (SIGKILL). ``sync=True`` also fsyncs the write-ahead log on every
write, so it survives power loss too, at the price of one disk flush per call (hundreds of
microseconds to milliseconds instead of about ten microseconds).

``EmbeddedLog.open_readonly(path)`` opens a RocksDB *secondary* instance, which works while
a daemon holds the directory for writing: every call first catches up with the writer's
files (``read`` only when it asks for a record it has not seen yet), and ``wait`` polls
every ``POLL_S`` for records another process appends. A catch-up costs about 26 us.
"""

from __future__ import annotations

import shutil
import struct
import tempfile
import threading
import time
from pathlib import Path
from typing import Sequence

import rocksdict

from . import frame, log_segments, logs
from .errors import BackendUnavailable, CorruptRecord, NotFound, OffsetOutOfRange, UsageError
from .log import DEFAULT_READ_BYTES, DEFAULT_READ_RECORDS, Log, LogRecord, check_partition_name
from .offsets import NO_OFFSET

log = logs.get(__name__)

LAYOUT_VERSION = b"1"
POLL_S = 0.05  # how often wait() looks for appends it cannot be notified of
_FAMILIES = ("partitions", "records", "index", "consumers")
_I64 = struct.Struct(">q")
_META = struct.Struct(">qqqq")  # start, end, appended bytes, last timestamp
_INDEX = struct.Struct(">qq")  # timestamp, payload bytes appended before this record
_SEP = b"\x00"
_FRAMING = frame.HEADER_LEN + _I64.size  # stored frame bytes that are not payload


class _Partition:
    """In-memory metadata of one partition; fields change only under ``lock``."""

    __slots__ = ("name", "prefix", "lock", "cond", "start", "end", "appended", "last_ts", "dropped")

    def __init__(self, name: str, meta: bytes | None = None):
        self.name = name
        self.prefix = name.encode("ascii") + _SEP
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.dropped = False
        self.load(meta or _META.pack(0, 0, 0, 0))

    def load(self, meta: bytes) -> None:
        self.start, self.end, self.appended, self.last_ts = _META.unpack(meta)

    def meta(self) -> bytes:
        return _META.pack(self.start, self.end, self.appended, self.last_ts)

    def key(self, offset: int) -> bytes:
        return self.prefix + _I64.pack(offset)

    def bounds(self) -> tuple[bytes, bytes]:
        """Every key of this partition is in ``[lower, upper)``."""
        return self.prefix, self.prefix[:-1] + b"\x01"


class EmbeddedLog(Log):
    """A ``Log`` in one RocksDB directory. Use as a context manager or call ``close``."""

    def __init__(self, path: str | Path, sync: bool = False, *, _secondary: Path | None = None):
        self.path = Path(path)
        self.readonly = _secondary is not None
        self._secondary = _secondary
        self._lock = threading.Lock()  # guards the partition table, open/close
        self._parts: dict[str, _Partition] = {}
        self._write_opt = rocksdict.WriteOptions()
        self._write_opt.sync = sync
        self._segments = log_segments.Segments(self.path / "segments", sync=sync)
        self._open_db()
        if not self.readonly:
            try:
                self._load()
            except Exception:
                self.close()  # release the directory (its lock) for whoever repairs it
                raise
        log.info("log opened", msgid="DT-L001", path=str(self.path), sync=sync, readonly=self.readonly)

    def _load(self) -> None:
        """The writer's start: the layout version, the partition table, tidy segments."""
        try:
            fresh = self._db.get(b"format") is None
        except Exception as exc:
            raise self._failure(exc, "layout version") from None
        if fresh:
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(b"format", LAYOUT_VERSION)
            self._write(batch, "layout version")
        for name, meta in self._scan("partitions", b"", None, "partition table"):
            self._parts[name.decode("ascii")] = _Partition(name.decode("ascii"), meta)
        self._tidy_segments()

    @classmethod
    def open_readonly(cls, path: str | Path) -> EmbeddedLog:
        """Open for reading while another process may hold ``path`` for writing."""
        if not (Path(path) / "CURRENT").exists():
            raise NotFound(what="log", name=str(path))
        return cls(path, _secondary=Path(tempfile.mkdtemp(prefix="dt-log-reader-")))

    def _open_db(self) -> None:
        options = rocksdict.Options(raw_mode=True)
        options.create_if_missing(True)
        options.create_missing_column_families(True)
        options.set_keep_log_file_num(4)
        families = {name: rocksdict.Options(raw_mode=True) for name in _FAMILIES}
        # Payloads arrive compressed (engine/codec.py); compressing them again wastes CPU.
        families["records"].set_compression_type(rocksdict.DBCompressionType.none())
        access = rocksdict.AccessType.read_write()
        if self.readonly:
            options.set_max_open_files(-1)  # required by secondary instances
            # Each catch-up would otherwise start RocksDB's 16 file-opening threads:
            # 2.9 ms per catch-up instead of 26 us.
            options.set_max_file_opening_threads(1)
            access = rocksdict.AccessType.secondary(str(self._secondary))
        else:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            self._db = rocksdict.Rdict(str(self.path), options, column_families=families, access_type=access)
        except Exception as exc:  # rocksdict raises plain Exception for every RocksDB status
            if self._secondary:
                shutil.rmtree(self._secondary, ignore_errors=True)
            raise BackendUnavailable(backend=f"embedded log {self.path}", detail=str(exc)) from exc
        self._cf = {name: self._db.get_column_family(name) for name in _FAMILIES}
        self._handle = {name: self._db.get_column_family_handle(name) for name in _FAMILIES}

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> EmbeddedLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the directory; further calls raise UsageError. Closing twice is harmless."""
        with self._lock:
            if self._db is None:
                return
            for part in self._parts.values():
                with part.cond:
                    part.cond.notify_all()
            # Column family objects keep RocksDB open; drop them before closing the DB.
            self._cf = self._handle = None
            db, self._db = self._db, None
            try:
                db.close()
            except Exception as exc:  # a failed flush: what it held is in the write-ahead log
                raise self._failure(exc, "closing") from None
            finally:
                del db  # the last reference: RocksDB is released (its lock too) even after an error
                self._segments.close()
                if self._secondary:
                    shutil.rmtree(self._secondary, ignore_errors=True)
        log.info("log closed", msgid="DT-L002", path=str(self.path))

    # -- partitions --------------------------------------------------------------------

    def ensure_partition(self, partition: str) -> None:
        check_partition_name(partition)
        self._writable()
        with self._lock:
            if partition in self._parts:
                return
            part = _Partition(partition)
            self._segments.drop(partition)  # what a crashed drop_partition left behind
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(partition.encode("ascii"), part.meta(), self._handle["partitions"])
            self._write(batch, f"creating partition {partition}")
            self._parts[partition] = part
        log.info("partition created", msgid="DT-L003", partition=partition)

    def drop_partition(self, partition: str) -> None:
        self._writable()
        part = self._part(partition)
        with self._lock, part.lock:
            self._alive(part)
            lower, upper = part.bounds()
            batch = rocksdict.WriteBatch(raw_mode=True)
            for family in ("records", "index", "consumers"):
                batch.delete_range(lower, upper, self._handle[family])
            batch.delete(partition.encode("ascii"), self._handle["partitions"])
            self._write(batch, f"dropping partition {partition}")
            part.dropped = True
            del self._parts[partition]
            self._segments.drop(partition)
            part.cond.notify_all()
        log.info("partition dropped", msgid="DT-L004", partition=partition)

    def partitions(self) -> list[str]:
        self._refresh()
        if self.readonly:
            return sorted(key.decode("ascii") for key, _ in self._scan("partitions", b"", None, "partition table"))
        with self._lock:
            return sorted(self._parts)

    # -- records -----------------------------------------------------------------------

    def append(self, partition: str, values: Sequence[bytes], timestamp_ns: int | None = None) -> int:
        """Append ``values`` in one atomic batch; return the first offset. Durable on return."""
        self._writable()
        if isinstance(values, (bytes, bytearray, memoryview)):
            raise UsageError(detail="append takes a sequence of values, not one bytes object")
        part = self._part(partition)
        stamp = time.time_ns() if timestamp_ns is None else int(timestamp_ns)
        with part.lock:
            self._alive(part)
            first, appended, stamp = part.end, part.appended, max(stamp, part.last_ts)
            count = len(values)
            if count == 0:
                return first
            stored = self._store(part, first, _I64.pack(stamp), values)
            batch = rocksdict.WriteBatch(raw_mode=True)
            records, index = self._handle["records"], self._handle["index"]
            for offset, (value, record) in enumerate(zip(values, stored), first):
                key = part.key(offset)
                batch.put(key, record, records)
                batch.put(key, _INDEX.pack(stamp, appended), index)
                appended += len(value)
            batch.put(part.prefix[:-1], _META.pack(part.start, first + count, appended, stamp),
                      self._handle["partitions"])
            self._write(batch, f"appending to partition {partition}")
            part.end, part.appended, part.last_ts = first + count, appended, stamp
            part.cond.notify_all()
        return first

    def _store(self, part: _Partition, first: int, stamp: bytes, values: Sequence[bytes]) -> list[bytes]:
        """What the records family stores for each value: its sealed frame, or for a large
        one a pointer to the frame written to a segment (engine/log_segments.py)."""
        stored: list[bytes | None] = []
        large: list[tuple[int, list[bytes]]] = []
        for offset, value in enumerate(values, first):
            if len(value) + _FRAMING < log_segments.MIN_BYTES:
                stored.append(frame.seal(stamp + value))
            else:
                stored.append(None)
                large.append((offset, [frame.header(stamp, value), stamp, value]))
        if large:
            pointers = iter(self._segments.write(part.name, large))
            stored = [next(pointers) if record is None else record for record in stored]
        return stored

    def read(self, partition: str, start: int, max_records: int = DEFAULT_READ_RECORDS,
             max_bytes: int = DEFAULT_READ_BYTES) -> list[LogRecord]:
        part = self._reading(partition, start)
        end = part.end  # before the iterator: every record below it is in the iterator's view
        if start < part.start or start > end:
            raise OffsetOutOfRange(offset=start, start=part.start, end=end)
        stop = min(end, start + max(1, max_records))
        if start == stop:
            return []
        bound = rocksdict.ReadOptions()
        bound.set_iterate_upper_bound(part.key(stop))
        records: list[LogRecord] = []
        total = 0
        expected = start
        for key, stored in self._cf["records"].items(from_key=part.key(start), read_opt=bound):
            offset = _I64.unpack_from(key, len(part.prefix))[0]
            if offset != expected:
                self._missing(part, expected)
            pointer = log_segments.is_pointer(stored)
            size = (log_segments.frame_length(stored) if pointer else len(stored)) - _FRAMING
            if records and total + size > max_bytes:
                return records
            records.append(self._record(part, offset, stored, pointer))
            total += size
            expected += 1
            if total >= max_bytes:
                return records
        if expected < stop:
            self._missing(part, expected)
        return records

    def wait(self, partition: str, offset: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        part = self._part(partition)
        while part.end <= offset:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or part.dropped:
                return False
            with part.cond:
                if part.end <= offset and not part.dropped and self._db is not None:
                    part.cond.wait(min(remaining, POLL_S))
            part = self._part(partition)
        return True

    def start_offset(self, partition: str) -> int:
        return self._part(partition).start

    def end_offset(self, partition: str) -> int:
        return self._part(partition).end

    def offset_for_time(self, partition: str, timestamp_ns: int) -> int:
        part = self._part(partition)
        with part.lock:
            low, high = part.start, part.end
            while low < high:  # first offset whose timestamp >= timestamp_ns
                middle = (low + high) // 2
                if self._index_at(part, middle)[0] >= timestamp_ns:
                    high = middle
                else:
                    low = middle + 1
            return low

    def truncate_before(self, partition: str, offset: int) -> None:
        self._writable()
        part = self._part(partition)
        with part.lock:
            self._alive(part)
            new_start = min(offset, part.end)
            if new_start <= part.start:
                return
            lower = part.key(0)
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.delete_range(lower, part.key(new_start), self._handle["records"])
            batch.delete_range(lower, part.key(new_start), self._handle["index"])
            batch.put(part.prefix[:-1], _META.pack(new_start, part.end, part.appended, part.last_ts),
                      self._handle["partitions"])
            self._write(batch, f"truncating partition {partition}")
            part.start = new_start
            self._segments.trim(partition, new_start, part.end)
        log.info("log truncated", msgid="DT-L005", partition=partition, start=new_start)

    def size(self, partition: str) -> tuple[int, int]:
        part = self._part(partition)
        with part.lock:
            if part.start == part.end:
                return 0, 0
            return part.appended - self._index_at(part, part.start)[1], part.end - part.start

    # -- consumer offsets --------------------------------------------------------------

    def commit(self, partition: str, consumer: str, offset: int) -> None:
        """Durably record ``offset`` (NO_OFFSET .. end_offset-1) as processed by ``consumer``."""
        self._writable()
        check_partition_name(consumer)
        part = self._part(partition)
        with part.lock:
            self._alive(part)
            if not NO_OFFSET <= offset < part.end:
                raise OffsetOutOfRange(offset=offset, start=NO_OFFSET, end=part.end)
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(part.prefix + consumer.encode("ascii"), _I64.pack(offset), self._handle["consumers"])
            self._write(batch, f"committing consumer {consumer}")

    def committed(self, partition: str, consumer: str) -> int:
        check_partition_name(consumer)
        part = self._part(partition)
        stored = self._get("consumers", part.prefix + consumer.encode("ascii"), f"partition {partition} consumers")
        return NO_OFFSET if stored is None else _I64.unpack(stored)[0]

    def consumers(self, partition: str) -> dict[str, int]:
        part = self._part(partition)
        lower, upper = part.bounds()
        return {key[len(lower):].decode("ascii"): _I64.unpack(value)[0]
                for key, value in self._scan("consumers", lower, upper, f"partition {partition} consumers")}

    # -- internals ---------------------------------------------------------------------

    def _writable(self) -> None:
        if self.readonly:
            raise UsageError(detail=f"the log {self.path} is open read-only")

    def _refresh(self) -> None:
        """Fail when closed; a reader first catches up with the writing process."""
        if self._db is None:
            raise UsageError(detail=f"the log {self.path} is closed")
        if self.readonly:
            self._db.try_catch_up_with_primary()

    def _reading(self, partition: str, start: int) -> _Partition:
        """The partition for a read from ``start``. A reader process catches up with the
        writer only when it has not seen that record yet (a catch-up reads the writer's
        new files); what it has seen stays readable (RocksDB files and segments it has
        open; one removed meanwhile reads as out of range, see ``_missing``)."""
        part = self._parts.get(partition) if self.readonly and self._db is not None else None
        if part is not None and start < part.end:
            return part
        return self._part(partition)

    def _part(self, partition: str) -> _Partition:
        self._refresh()
        part = self._parts.get(partition)
        if self.readonly:
            meta = self._get("partitions", check_partition_name(partition).encode("ascii"), "partition table")
            if meta is None:
                raise NotFound(what="partition", name=partition)
            if part is None:
                part = self._parts.setdefault(partition, _Partition(partition, meta))
            with part.lock:
                start = part.start
                part.load(meta)
            if part.start != start:  # the writer's retention may have removed segments we hold
                self._segments.release_removed(partition)
            return part
        if part is None:
            raise NotFound(what="partition", name=check_partition_name(partition))
        return part

    def _record(self, part: _Partition, offset: int, stored: bytes, pointer: bool) -> LogRecord:
        """The verified record from what the records family stores for it."""
        where = f"partition {part.name} offset {offset}"
        if pointer:
            try:  # a segment entry: header and timestamp, then the payload as it is (no copy)
                head, value = self._segments.read(part.name, offset, stored, _FRAMING)
            except FileNotFoundError:
                self._missing(part, offset)  # removed by retention meanwhile, or lost
            except ValueError as exc:
                raise CorruptRecord(reason=f"{where}: {exc}") from None
        try:
            if pointer:
                frame.check_parts(head[:frame.HEADER_LEN], head[frame.HEADER_LEN:], value)
                return LogRecord(offset, _I64.unpack_from(head, frame.HEADER_LEN)[0], value)
            body = frame.check(stored)
            if len(stored) - body < _I64.size:
                raise CorruptRecord(reason="no timestamp")
            return LogRecord(offset, _I64.unpack_from(stored, body)[0], stored[body + _I64.size:])
        except CorruptRecord as exc:
            raise CorruptRecord(reason=f"{where}: {exc.params['reason']}") from exc

    def _tidy_segments(self) -> None:
        """Remove segments a crash left behind: those of dropped partitions, and those
        holding only records below their partition's start."""
        for name in self._segments.partitions():
            if name not in self._parts:
                self._segments.drop(name)
        for name, part in self._parts.items():
            self._segments.trim(name, part.start, part.end)

    def _failure(self, exc: Exception, what: str) -> Exception:
        """The log's error for RocksDB's plain Exception ``exc`` (module docstring), naming
        ``what``; any other exception as it is. (A try statement, not a context manager:
        that would add a tenth to every append.)"""
        if type(exc) is not Exception:
            return exc
        if str(exc).startswith("Corruption"):
            return CorruptRecord(reason=f"{what}: {exc}")
        return BackendUnavailable(backend=f"embedded log {self.path}", detail=f"{what}: {exc}")

    def _write(self, batch: rocksdict.WriteBatch, what: str) -> None:
        try:
            self._db.write(batch, self._write_opt)
        except Exception as exc:
            raise self._failure(exc, what) from None

    def _get(self, family: str, key: bytes, what: str) -> bytes | None:
        """The value of ``key`` in ``family`` (None when absent); a damaged block holding
        it is CorruptRecord naming ``what``."""
        try:
            return self._cf[family].get(key)
        except Exception as exc:
            raise self._failure(exc, what) from None

    def _scan(self, family: str, lower: bytes, upper: bytes | None, what: str) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of ``family`` in ``[lower, upper)`` (no upper bound: None), in
        key order; a damaged block on the way is CorruptRecord naming ``what``."""
        bound = rocksdict.ReadOptions()
        if upper is not None:
            bound.set_iterate_upper_bound(upper)
        found = []
        try:
            cursor = self._cf[family].iter(bound)
            cursor.seek(lower)
            while cursor.valid():
                found.append((cursor.key(), cursor.value()))
                cursor.next()
            cursor.status()  # raises when the scan ended at an error, not at the end
        except Exception as exc:
            raise self._failure(exc, what) from None
        return found

    @staticmethod
    def _alive(part: _Partition) -> None:
        """Under ``part.lock``: the partition was not dropped since it was looked up."""
        if part.dropped:
            raise NotFound(what="partition", name=part.name)

    def _index_at(self, part: _Partition, offset: int) -> tuple[int, int]:
        stored = self._get("index", part.key(offset), f"partition {part.name} index")
        if stored is None or len(stored) != _INDEX.size:
            raise CorruptRecord(reason=f"partition {part.name}: index entry of offset {offset} is missing or damaged")
        return _INDEX.unpack(stored)

    def _missing(self, part: _Partition, offset: int):
        """A record the metadata promises is absent: truncated meanwhile, or lost."""
        current = self._part(part.name)
        with current.lock:  # a truncation in progress has written the batch, maybe not start
            start, end = current.start, current.end
        if offset < start:
            raise OffsetOutOfRange(offset=offset, start=start, end=end)
        raise CorruptRecord(reason=f"partition {part.name}: record {offset} is missing")
