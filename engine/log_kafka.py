"""The Kafka ``Log`` backend: each partition is a topic of an Apache Kafka cluster.

It implements the contract of engine/log.py (and passes tests/contract/log_contract.py);
this docstring adds what is specific to Kafka.

Mapping
-------
==========================  =============================================================
Log                         Kafka
==========================  =============================================================
partition ``P``             topic ``<prefix>P`` with exactly one Kafka partition, so the
                            order of records is total; created and deleted through the
                            admin client, never implicitly (auto-creation is off in every
                            client this backend opens). Kafka refuses a name that differs
                            from an existing topic's only by '.' versus '_' (their metrics
                            would collide): ensure_partition raises InvalidName for it
offset                      the Kafka offset (dense: no transactions, no compaction)
record value                ``frame.seal(payload)``, the checksummed frame of engine/frame.py
record timestamp            Kafka CreateTime in ms; the exact ns value in a header
consumer ``C`` of ``P``     the committed offset of consumer group ``<prefix>P:C`` on the
                            topic. Kafka stores the *next* offset to read, so it holds
                            ``committed + 1`` (0 for NO_OFFSET). ':' cannot occur in a
                            partition name, so no two (partition, consumer) pairs share a
                            group, and Kafka's own tools show every consumer's lag.
truncate_before             DeleteRecords (moves the topic's log start offset)
==========================  =============================================================

Record headers (ASCII values), so that any Kafka consumer can find and decode the stream:

- ``dt-frame``: the frame version of engine/frame.py ("2"; topics written before hold "1").
- ``dt-schema``: what the payload is, ``datatether.event/v<N>`` for events (engine/codec.py;
  the payload's first byte names the exact writer schema version).
- ``dt-time-ns``: the record timestamp in ns (the Kafka timestamp is that value in ms; a
  header that disagrees with it makes the record corrupt).
- ``dt-bytes-before``: payload bytes appended to the partition before this record, so
  ``size`` reads two records instead of every retained one.

Writing
-------
One idempotent producer per KafkaLog (``acks=all``, zstd). ``append`` produces the whole
batch, flushes, and takes offsets from the delivery reports. The batch lands on consecutive
offsets because one producer writes it in order to one Kafka partition while a lock per
partition keeps other appends of this KafkaLog out: **a partition has one writing KafkaLog
at a time** (the source of its connection). ``append`` checks the delivered offsets and
raises rather than report a batch that someone else interleaved. ``append`` is durable on
return as far as ``acks=all`` goes: every in-sync replica has the records (Kafka does not
fsync per record; a single-broker cluster keeps them in the page cache, which survives the
broker being killed but not a power loss). If the cluster cannot be reached for
``delivery_timeout_s``, ``append`` raises BackendUnavailable; some of the batch may have
been appended (``end_offset`` says how far it got). Timestamps never decrease within a
partition: an append older than the previous record takes the previous record's time.

Reading
-------
A single consumer with manual assignment reads (no group membership, no rebalancing, no
automatic commits); a read that continues where the previous one stopped reuses what the
client already fetched. ``auto.offset.reset=error``: a record removed by retention is an
OffsetOutOfRange, never a silent jump. Two checks guard every record: Kafka's CRC32C of the
batch (``check.crcs``; a damaged batch, e.g. a bad disk under the broker, makes every
record in it CorruptRecord) and the frame's checksum of the payload (damage anywhere
between the appending process and the reader). A fetch error counts only for the record it
is about: the reader fetches ahead after a read, and what that prefetch met further on
(e.g. a damaged batch) never makes the intact records before it unreadable.

Retention
---------
The product's history window and byte bound are enforced by engine/retention.py through
``truncate_before``, as for every backend: it never drops a record some consumer has not
processed. Topics are therefore created with Kafka's own time and size retention off
(``retention.ms=-1``, ``retention.bytes=-1``; a cluster default such as 7 days would
otherwise delete unconsumed records). ``retention_s`` and ``retention_bytes`` set them
anyway, as an outer bound an operator may want on a shared cluster; Kafka then deletes
whole segments regardless of consumers, and a consumer that falls behind gets
OffsetOutOfRange (never a silent jump), i.e. its connection needs a remirror.
Kafka expires the committed offsets of a group without members after
``offsets.retention.minutes`` (7 days by default): clusters that hold paused consumers
longer should raise it (the project's test broker keeps them a year).

Requirements: Kafka 3.6 or later (topics are created with ``message.timestamp.after.max.ms``
so that a source clock ahead of the broker's is not refused), KRaft or ZooKeeper alike.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from typing import Sequence

from confluent_kafka import (OFFSET_INVALID, TIMESTAMP_CREATE_TIME, Consumer, KafkaError,
                             KafkaException, Message, Producer, TopicPartition)
from confluent_kafka.admin import AdminClient, NewTopic

from . import codec, frame, logs
from .errors import (BackendUnavailable, CorruptRecord, InvalidName, NotFound, OffsetOutOfRange,
                     SettingsError, UsageError)
from .log import DEFAULT_READ_BYTES, DEFAULT_READ_RECORDS, Log, LogRecord, check_partition_name
from .offsets import NO_OFFSET
from .settings import KAFKA_MAX_RECORD_BYTES, KAFKA_TOPIC_PREFIX

log = logs.get(__name__)

EVENT_SCHEMA = f"datatether.event/v{codec.CURRENT_VERSION}"
HEADER_FRAME = "dt-frame"
HEADER_SCHEMA = "dt-schema"
HEADER_TIME = "dt-time-ns"
HEADER_BYTES_BEFORE = "dt-bytes-before"
GROUP_SEPARATOR = ":"  # never in a partition name: groups are unambiguous
MAX_RECORD_BYTES = KAFKA_MAX_RECORD_BYTES  # largest payload one record may carry
_BATCH_SLACK = 64 << 10  # room for Kafka's batch and header overhead above one payload
POLL_S = 0.05  # how often wait() asks for the end offset
_TOPIC_PREFIX = re.compile(KAFKA_TOPIC_PREFIX)
_GONE = {KafkaError._UNKNOWN_PARTITION, KafkaError._UNKNOWN_TOPIC, KafkaError.UNKNOWN_TOPIC_OR_PART}
# Errors of a cluster in motion (a broker restarting, a leader or coordinator moving): the
# same call succeeds a moment later, so they are retried until ``timeout_s``.
# _DESTROY_BROKER: a request was on a broker connection the client replaced (a restarted
# broker comes back under its node id, and the bootstrap connection is retired).
_TRANSIENT = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT,
              KafkaError._DESTROY_BROKER, KafkaError.REQUEST_TIMED_OUT, KafkaError.NOT_LEADER_FOR_PARTITION,
              KafkaError.LEADER_NOT_AVAILABLE, KafkaError.UNKNOWN_LEADER_EPOCH,
              KafkaError.FENCED_LEADER_EPOCH, KafkaError.OFFSET_NOT_AVAILABLE,
              KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
              KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.NOT_ENOUGH_REPLICAS,
              KafkaError.KAFKA_STORAGE_ERROR}
_DAMAGED = {KafkaError._BAD_MSG, KafkaError._BAD_COMPRESSION}  # failed CRC32C, undecodable batch
_NS_PER_MS = 1_000_000


@dataclass(frozen=True)
class _Tail:
    """Where the next append of one partition continues (cached per KafkaLog)."""

    end: int
    last_ts: int
    appended: int  # payload bytes appended before offset ``end``


class KafkaLog(Log):
    """A ``Log`` on a Kafka cluster. Use as a context manager or call ``close``.

    ``config`` holds extra client properties for every client (librdkafka names, for
    example ``**{"security.protocol": "SSL"}``). ``replication_factor=-1`` takes the
    cluster's default for new topics. ``timeout_s`` bounds each call against the cluster
    (metadata, offsets, admin requests, reads); ``delivery_timeout_s`` bounds an append.
    """

    def __init__(self, bootstrap: str, *, topic_prefix: str = "dt.", retention_s: int | None = None,
                 retention_bytes: int | None = None, replication_factor: int = -1,
                 schema: str = EVENT_SCHEMA, timeout_s: float = 30.0, delivery_timeout_s: float = 120.0,
                 **config: str):
        if not _TOPIC_PREFIX.match(topic_prefix):
            raise InvalidName(name=topic_prefix, reason="a topic prefix uses letters, digits, '.', '_' and '-' (0-40)")
        self.bootstrap = bootstrap
        self.prefix = topic_prefix
        self._backend = f"Kafka at {bootstrap}"
        self._schema = schema.encode()
        self._timeout_s = timeout_s
        self._delivery_timeout_s = delivery_timeout_s
        self._replication = replication_factor
        self._topic_config = {
            "cleanup.policy": "delete",
            "retention.ms": str(-1 if retention_s is None else retention_s * 1000),
            "retention.bytes": str(-1 if retention_bytes is None else retention_bytes),
            "message.timestamp.type": "CreateTime",
            # Kafka 4 refuses timestamps more than an hour ahead by default; the Log takes any.
            "message.timestamp.after.max.ms": str(2**63 - 1),
            "max.message.bytes": str(MAX_RECORD_BYTES + _BATCH_SLACK),
        }
        common = {**config, "bootstrap.servers": bootstrap, "allow.auto.create.topics": False}
        self._common = common
        try:
            self._make_clients(common, topic_prefix, delivery_timeout_s)
        except KafkaException as exc:  # an unknown property or a value librdkafka refuses
            raise SettingsError(detail=f"Kafka client properties: {exc.args[0].str()}") from exc
        self._closed = False
        self._read_lock = threading.Lock()
        self._reader_next: tuple[str, int] | None = None  # what the reader's queue holds next
        self._append_locks: dict[str, threading.Lock] = {}
        self._tails: dict[str, _Tail] = {}
        self._committers_lock = threading.Lock()
        self._committers: dict[str, _Committer] = {}  # by consumer group, made at its first commit
        log.info("log opened", msgid="DT-K101", bootstrap=bootstrap, prefix=topic_prefix)

    def _make_clients(self, common: dict, topic_prefix: str, delivery_timeout_s: float) -> None:
        self._admin = AdminClient(common)
        self._producer = Producer({
            **common, "enable.idempotence": True, "acks": "all", "compression.type": "zstd",
            "linger.ms": 2, "message.timeout.ms": int(delivery_timeout_s * 1000),
            "message.max.bytes": MAX_RECORD_BYTES + _BATCH_SLACK})
        self._reader = Consumer({
            **common, "group.id": f"{topic_prefix}reader", "enable.auto.commit": False,
            "enable.auto.offset.store": False, "auto.offset.reset": "error", "check.crcs": True,
            # A new position waits for the fetch in flight: keep it short. The reader stops
            # fetching once a read reaches the end, so an idle log does not poll the broker.
            "fetch.wait.max.ms": 10, "queued.max.messages.kbytes": 32768})

    # -- context manager ---------------------------------------------------------------

    def __enter__(self) -> KafkaLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Release the clients; further calls raise UsageError. Closing twice is harmless."""
        if self._closed:
            return
        self._closed = True
        self._producer.flush(self._timeout_s)
        with self._read_lock:
            self._reader.close()
        with self._committers_lock:
            for committer in self._committers.values():
                committer.close()
        # The clients keep connections (and reconnect attempts) until they are freed.
        self._producer = self._admin = None
        log.info("log closed", msgid="DT-K102", bootstrap=self.bootstrap)

    # -- partitions --------------------------------------------------------------------

    def ensure_partition(self, partition: str) -> None:
        topic = self._topic(partition)
        new = NewTopic(topic, 1, self._replication, config=self._topic_config)
        try:
            self._call(lambda: self._admin.create_topics([new], request_timeout=self._timeout_s)[topic],
                       f"creating topic {topic}", ignore={KafkaError.TOPIC_ALREADY_EXISTS})
        except BackendUnavailable as exc:
            cause = exc.__cause__.args[0] if isinstance(exc.__cause__, KafkaException) else None
            if cause is not None and cause.code() == KafkaError.TOPIC_EXCEPTION:  # invalid or colliding name
                raise InvalidName(name=partition, reason=cause.str()) from exc
            raise
        self._until(lambda: self._present(topic), f"topic {topic} to appear")
        log.info("partition ensured", msgid="DT-K103", topic=topic)

    def drop_partition(self, partition: str) -> None:
        topic = self._topic(partition)
        self._watermarks(topic, partition)  # NotFound when absent
        groups = list(self._groups(topic))
        # The topic first: Kafka drops the groups' offsets on it with it, so even a failed
        # group deletion below cannot resurrect offsets for a later topic of the same name.
        self._call(lambda: self._admin.delete_topics([topic], operation_timeout=self._timeout_s)[topic],
                   f"deleting topic {topic}", ignore={KafkaError.UNKNOWN_TOPIC_OR_PART})
        for group in groups:
            self._call(lambda: self._admin.delete_consumer_groups([group], request_timeout=self._timeout_s)[group],
                       f"deleting consumer group {group}", ignore={KafkaError.GROUP_ID_NOT_FOUND})
        with self._append_lock(topic):
            self._tails.pop(topic, None)
        with self._read_lock:
            if self._reader_next and self._reader_next[0] == topic:
                self._reader.unassign()
                self._reader_next = None
        self._until(lambda: not self._present(topic), f"topic {topic} to disappear")
        log.info("partition dropped", msgid="DT-K104", topic=topic)

    def partitions(self) -> list[str]:
        self._check_open()
        topics = self._metadata().topics
        names = (topic[len(self.prefix):] for topic in topics if topic.startswith(self.prefix))
        return sorted(name for name in names if _valid_name(name))

    # -- records -----------------------------------------------------------------------

    def append(self, partition: str, values: Sequence[bytes], timestamp_ns: int | None = None) -> int:
        """Append ``values`` on consecutive offsets; return the first. Durable on return."""
        if isinstance(values, (bytes, bytearray, memoryview)):
            raise UsageError(detail="append takes a sequence of values, not one bytes object")
        topic = self._topic(partition)
        stamp = time.time_ns() if timestamp_ns is None else int(timestamp_ns)
        with self._append_lock(topic):
            tail = self._tail(topic, partition)
            if not values:
                return tail.end
            stamp = max(stamp, tail.last_ts)
            delivered: list[Message | None] = [None] * len(values)
            appended = tail.appended
            for index, value in enumerate(values):
                self._produce(topic, value, stamp, appended, delivered, index)
                appended += len(value)
            self._producer.flush()  # bounded by message.timeout.ms (delivery_timeout_s)
            self._tails.pop(topic, None)  # re-read from the topic unless all is as planned
            self._check_delivered(topic, delivered, tail.end)
            self._tails[topic] = _Tail(tail.end + len(values), stamp, appended)
        return tail.end

    def read(self, partition: str, start: int, max_records: int = DEFAULT_READ_RECORDS,
             max_bytes: int = DEFAULT_READ_BYTES) -> list[LogRecord]:
        topic = self._topic(partition)
        low, high = self._watermarks(topic, partition)
        if start < low or start > high:
            raise OffsetOutOfRange(offset=start, start=low, end=high)
        stop = min(high, start + max(1, max_records))
        if start == stop:
            return []
        messages = self._fetch(topic, partition, start, stop, max_bytes, more=stop < high)
        return [_record(partition, message) for message in messages]

    def wait(self, partition: str, offset: int, timeout_s: float) -> bool:
        topic = self._topic(partition)
        deadline = time.monotonic() + timeout_s
        while self._watermarks(topic, partition)[1] <= offset:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, POLL_S))
        return True

    def start_offset(self, partition: str) -> int:
        return self._watermarks(self._topic(partition), partition)[0]

    def end_offset(self, partition: str) -> int:
        return self._watermarks(self._topic(partition), partition)[1]

    def offset_for_time(self, partition: str, timestamp_ns: int) -> int:
        """Kafka finds the ms; the ns headers settle the records of that one ms."""
        topic = self._topic(partition)
        low, high = self._watermarks(topic, partition)
        first_ms = max(0, timestamp_ns // _NS_PER_MS)  # Kafka reads negative times as special offsets
        # Every record before ``lower`` is older than first_ms; every one from ``upper`` on is
        # at least a ms newer, hence >= timestamp_ns. Timestamps never decrease (append).
        lower = max(low, self._offset_at_ms(topic, first_ms, high))
        upper = max(lower, self._offset_at_ms(topic, first_ms + 1, high))
        while lower < upper:
            middle = (lower + upper) // 2
            if _timestamp_ns(self._one(topic, partition, middle)) >= timestamp_ns:
                upper = middle
            else:
                lower = middle + 1
        return lower

    def truncate_before(self, partition: str, offset: int) -> None:
        topic = self._topic(partition)
        low, high = self._watermarks(topic, partition)
        new_start = min(offset, high)
        if new_start <= low:
            return
        where = TopicPartition(topic, 0, new_start)
        self._call(lambda: self._admin.delete_records([where], request_timeout=self._timeout_s,
                                                      operation_timeout=self._timeout_s)[where],
                   f"deleting records of {topic} below {new_start}")
        log.info("log truncated", msgid="DT-K105", topic=topic, start=new_start)

    def size(self, partition: str) -> tuple[int, int]:
        """Payload bytes retained, from the byte counters of the first and last record."""
        topic = self._topic(partition)
        low, high = self._watermarks(topic, partition)
        if low == high:
            return 0, 0
        last = self._one(topic, partition, high - 1)
        retained = (_bytes_before(partition, last) + _payload_len(last)
                    - _bytes_before(partition, self._one(topic, partition, low)))
        if retained < 0:
            raise CorruptRecord(reason=f"partition {partition}: byte counters of offsets {low} and "
                                f"{high - 1} disagree (written by another producer?)")
        return retained, high - low

    # -- consumer offsets --------------------------------------------------------------

    def commit(self, partition: str, consumer: str, offset: int) -> None:
        """Durably record ``offset`` (NO_OFFSET .. end_offset-1) as processed by ``consumer``."""
        check_partition_name(consumer)
        topic = self._topic(partition)
        high = self._watermarks(topic, partition)[1]
        if not NO_OFFSET <= offset < high:
            raise OffsetOutOfRange(offset=offset, start=NO_OFFSET, end=high)
        group = self._group(topic, consumer)
        with self._committers_lock:
            committer = self._committers.get(group) or self._committers.setdefault(group, _Committer(self._common, group))
        where, deadline = TopicPartition(topic, 0, offset + 1), self._deadline()
        result = self._retrying(lambda: committer.commit(where, deadline), f"committing offset of {group}")
        for tp in result:
            if tp.error is not None:
                raise BackendUnavailable(backend=self._backend, detail=f"committing offset of {group}: {tp.error}")

    def committed(self, partition: str, consumer: str) -> int:
        check_partition_name(consumer)
        topic = self._topic(partition)
        self._watermarks(topic, partition)  # NotFound when absent
        return self._group_offsets(topic, [self._group(topic, consumer)]).get(consumer, NO_OFFSET)

    def consumers(self, partition: str) -> dict[str, int]:
        topic = self._topic(partition)
        self._watermarks(topic, partition)  # NotFound when absent
        return self._group_offsets(topic, list(self._groups(topic)))

    # -- internals: names and clients --------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(detail=f"the Kafka log at {self.bootstrap} is closed")

    def _topic(self, partition: str) -> str:
        self._check_open()
        return self.prefix + check_partition_name(partition)

    def _append_lock(self, topic: str) -> threading.Lock:
        return self._append_locks.setdefault(topic, threading.Lock())  # atomic: one lock per topic

    def _group(self, topic: str, consumer: str) -> str:
        return f"{topic}{GROUP_SEPARATOR}{consumer}"

    def _unavailable(self, what: str, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(backend=self._backend, detail=f"{what}: {exc}")

    def _call(self, submit, what: str, ignore: frozenset | set = frozenset()):
        """Run one admin request (``submit()`` returns its future) and return its result;
        transient errors are retried, errors in ``ignore`` count as success (None)."""
        return self._retrying(lambda: submit().result(timeout=self._timeout_s), what, ignore)

    def _retrying(self, attempt, what: str, ignore: frozenset | set = frozenset(),
                  patience_s: float | None = None):
        """``attempt()``'s result. Errors of a cluster in motion (``_TRANSIENT``: a broker
        restarting answers "transport failure" for a while) are retried for ``patience_s``
        (default ``timeout_s``); any other error, or the deadline, is BackendUnavailable.
        Errors in ``ignore`` count as success (None)."""
        deadline = self._deadline(patience_s)
        while True:
            try:
                return attempt()
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() in ignore:
                    return None
                if not _transient(error) or time.monotonic() > deadline:
                    raise self._unavailable(what, exc) from exc
            except TimeoutError as exc:  # the request's future: it carries no message of its own
                raise BackendUnavailable(backend=self._backend,
                                         detail=f"{what}: no answer within {self._timeout_s:g} s") from exc
            time.sleep(POLL_S)

    def _deadline(self, patience_s: float | None = None) -> float:
        """When a call that waits for the cluster gives up (default: ``timeout_s`` from now)."""
        return time.monotonic() + (self._timeout_s if patience_s is None else patience_s)

    def _until(self, condition, what: str) -> None:
        deadline = self._deadline()
        while not condition():
            if time.monotonic() > deadline:
                raise BackendUnavailable(backend=self._backend, detail=f"timed out waiting for {what}")
            time.sleep(POLL_S)

    def _metadata(self, topic: str | None = None):
        return self._retrying(lambda: self._admin.list_topics(topic=topic, timeout=self._timeout_s),
                              "reading cluster metadata")

    def _present(self, topic: str) -> bool:
        """The topic exists and its partition has a leader (it can take appends)."""
        found = self._metadata(topic).topics.get(topic)
        return (found is not None and found.error is None and 0 in found.partitions
                and found.partitions[0].leader >= 0)

    def _watermarks(self, topic: str, partition: str, patience_s: float | None = None) -> tuple[int, int]:
        """(start, end) offsets of the topic; NotFound when it does not exist. Errors Kafka
        calls retriable (a leader just elected, a broker restarting) are retried for
        ``patience_s`` (default ``timeout_s``)."""
        deadline = self._deadline(patience_s)
        while True:
            try:
                return self._reader.get_watermark_offsets(TopicPartition(topic, 0), timeout=self._timeout_s,
                                                          cached=False)
            except KafkaException as exc:
                error = exc.args[0]
                # "Unknown partition" comes from a stale cache (the topic was created by
                # another client) and from a broker that restarts: both pass once the
                # metadata, asked again, names the topic.
                if error.code() in _GONE and not self._reader_knows(topic, patience_s):
                    raise NotFound(what="partition", name=partition) from exc
                if not (_transient(error) or error.code() in _GONE) or time.monotonic() > deadline:
                    raise self._unavailable(f"reading the offsets of {topic}", exc) from exc
                time.sleep(POLL_S)
            except RuntimeError as exc:  # the reader was closed by another thread
                self._check_open()
                raise self._unavailable(f"reading the offsets of {topic}", exc) from exc

    def _reader_knows(self, topic: str, patience_s: float | None) -> bool:
        """Refresh the reader's metadata of ``topic`` (its cache may predate the topic's
        creation by another client) and tell whether the topic exists."""
        found = self._retrying(lambda: self._reader.list_topics(topic=topic, timeout=self._timeout_s),
                               "reading cluster metadata", patience_s=patience_s).topics.get(topic)
        return found is not None and (found.error is None or _transient(found.error))

    # -- internals: writing ------------------------------------------------------------

    def _tail(self, topic: str, partition: str) -> _Tail:
        """Under the append lock: the cached tail if the topic still ends there, else the
        tail as the topic's last record tells it (another KafkaLog may have appended).
        An append waits for the cluster as long as its delivery may (``delivery_timeout_s``)."""
        low, high = self._watermarks(topic, partition, self._delivery_timeout_s)
        cached = self._tails.get(topic)
        if cached is not None and cached.end == high:
            return cached
        if low == high:  # nothing retained: counters restart, only differences matter
            return _Tail(high, 0, 0)
        last = self._one(topic, partition, high - 1)
        try:
            return _Tail(high, _timestamp_ns(last), _bytes_before(partition, last) + _payload_len(last))
        except CorruptRecord as exc:  # a foreign or damaged last record must not block appends
            log.warning("last record has no usable headers; byte counters restart", msgid="DT-K106",
                        topic=topic, offset=high - 1, reason=exc.params["reason"])
            return _Tail(high, _timestamp_ns_of_kafka(last), 0)

    def _produce(self, topic: str, value: bytes, stamp: int, bytes_before: int,
                 delivered: list, index: int) -> None:
        def report(error, message, index=index):
            delivered[index] = error if error is not None else message
        headers = [(HEADER_FRAME, str(frame.VERSION).encode()), (HEADER_SCHEMA, self._schema),
                   (HEADER_TIME, str(stamp).encode()), (HEADER_BYTES_BEFORE, str(bytes_before).encode())]
        while True:
            try:
                self._producer.produce(topic, value=frame.seal(bytes(value)), headers=headers,
                                       timestamp=stamp // _NS_PER_MS, on_delivery=report)
                return
            except BufferError:  # the client's queue is full: let it send, then retry
                self._producer.poll(0.1)
            except KafkaException as exc:
                raise self._unavailable(f"appending to {topic}", exc) from exc

    def _check_delivered(self, topic: str, delivered: list, first: int) -> None:
        for index, outcome in enumerate(delivered):
            if not isinstance(outcome, Message):
                raise BackendUnavailable(backend=self._backend, detail=(
                    f"appending to {topic} failed at value {index} of {len(delivered)}: {outcome}; "
                    "the values before it may have been appended"))
            if outcome.offset() != first + index:
                raise BackendUnavailable(backend=self._backend, detail=(
                    f"value {index} of an append to {topic} landed at offset {outcome.offset()}, not "
                    f"{first + index}: another producer writes to it (one writer per partition)"))

    # -- internals: reading ------------------------------------------------------------

    def _fetch(self, topic: str, partition: str, start: int, stop: int, max_bytes: int,
               more: bool = False) -> list[Message]:
        """The raw messages ``start .. stop-1`` in order, cut as ``read`` cuts by ``max_bytes``
        (at least one). A missing record is OffsetOutOfRange if retention removed it
        meanwhile, else CorruptRecord. ``more``: records follow and the caller will likely
        ask for them next, so the reader keeps fetching ahead; otherwise it stops fetching
        (an idle reader must not poll the broker)."""
        with self._read_lock:
            self._check_open()
            if self._reader_next != (topic, start):
                self._reader.assign([TopicPartition(topic, 0, start)])
            self._reader_next = None  # unknown unless this fetch ends cleanly
            try:
                messages, ahead = self._consume(topic, partition, start, stop, max_bytes)
            except BaseException:
                self._reader.unassign()
                raise
            if more and not ahead:
                self._reader_next = (topic, start + len(messages))
            else:
                self._reader.unassign()
        return messages

    def _consume(self, topic: str, partition: str, start: int, stop: int,
                 max_bytes: int) -> tuple[list[Message], bool]:
        """Under the read lock: the messages, and whether one more was consumed and dropped."""
        messages: list[Message] = []
        total = 0
        stalled = False  # a stale offset reset came: it may have stopped the fetching
        deadline = self._deadline()
        while start + len(messages) < stop:
            if time.monotonic() > deadline:
                raise BackendUnavailable(backend=self._backend, detail=(
                    f"reading {topic} at offset {start + len(messages)}: no answer within "
                    f"{self._timeout_s:.0f} s"))
            batch = self._reader.consume(stop - start - len(messages), timeout=POLL_S * 5)
            if stalled and not batch:  # nothing delivered since: nothing is lost by starting again
                self._reader.assign([TopicPartition(topic, 0, start + len(messages))])
                stalled = False
            for message in batch:
                expected = start + len(messages)
                if message.error() is not None:
                    stalled |= self._fetch_error(topic, partition, expected, message)
                    continue
                if message.offset() != expected:
                    self._missing(topic, partition, expected)
                size = _payload_len(message)
                if messages and total + size > max_bytes:
                    return messages, True
                messages.append(message)
                total += size
                if total >= max_bytes:
                    return messages, False
                deadline = self._deadline()
        return messages, False

    def _fetch_error(self, topic: str, partition: str, expected: int, message: Message) -> bool:
        """Raise for a fetch error about record ``expected``; ignore the others, returning
        True for an offset reset that was not about it.

        librdkafka reports a damaged batch at the batch's first offset (<= ``expected`` when
        the batch holds it) and a position it could not fetch at that position. Not every
        report is about this read: after a read the reader fetches ahead, and an offset
        reset from that prefetch (e.g. the client misreads the bytes after a damaged batch
        and asks for an offset that does not exist) outlives a new assignment: it may come
        first in the queue and may even stop the new fetching. Blaming ``expected`` for it
        would make the intact records before a damaged one unreadable."""
        error = message.error()
        offset = message.offset()
        if error.code() in (KafkaError._AUTO_OFFSET_RESET, KafkaError.OFFSET_OUT_OF_RANGE):
            if offset == expected:
                self._missing(topic, partition, expected)
            log.debug("stale fetch error ignored", msgid="DT-K107", topic=topic, offset=offset,
                      expected=expected, error=error.str())
            return True
        if error.code() in _DAMAGED:
            if offset <= expected:
                raise CorruptRecord(reason=f"partition {partition}: the Kafka batch holding offset {expected} "
                                    f"is damaged ({error.str()})")
            return False  # damage further on: a read that asks for it meets it again
        if error.fatal() or error.code() in _GONE:
            raise BackendUnavailable(backend=self._backend, detail=f"reading {topic} at offset {expected}: {error}")
        return False  # anything else (a broker connection lost, a leader moving) the client retries itself

    def _missing(self, topic: str, partition: str, offset: int):
        low, high = self._watermarks(topic, partition)
        if offset < low:
            raise OffsetOutOfRange(offset=offset, start=low, end=high)
        raise CorruptRecord(reason=f"partition {partition}: record {offset} is missing")

    def _one(self, topic: str, partition: str, offset: int) -> Message:
        return self._fetch(topic, partition, offset, offset + 1, MAX_RECORD_BYTES)[0]

    def _offset_at_ms(self, topic: str, ms: int, high: int) -> int:
        """First offset whose Kafka timestamp is >= ``ms``, else ``high``."""
        found = self._retrying(
            lambda: self._reader.offsets_for_times([TopicPartition(topic, 0, ms)], timeout=self._timeout_s),
            f"looking up a time in {topic}")
        offset = found[0].offset
        return high if offset < 0 else min(offset, high)

    # -- internals: consumer groups ----------------------------------------------------

    def _groups(self, topic: str):
        """Ids of the consumer groups named after ``topic`` (those this backend commits)."""
        listing = self._call(lambda: self._admin.list_consumer_groups(request_timeout=self._timeout_s),
                             "listing consumer groups")
        prefix = topic + GROUP_SEPARATOR
        return (group.group_id for group in listing.valid if group.group_id.startswith(prefix))

    def _group_offsets(self, topic: str, groups: list[str]) -> dict[str, int]:
        """{consumer: last processed offset} of those ``groups`` that committed on ``topic``."""
        found = {}
        for group in groups:
            offset = self._group_committed(topic, group)
            if offset != OFFSET_INVALID and offset >= 0:
                found[group[len(topic) + 1:]] = offset - 1
        return found

    def _group_committed(self, topic: str, group: str) -> int:
        """The next offset ``group`` committed on ``topic`` (OFFSET_INVALID: none), read by
        a consumer client of that group. Not by the admin client: librdkafka (issue 5040,
        still in 2.16) dereferences the consumer-group handle an admin client lacks when an
        offset fetch meets NOT_COORDINATOR, as it does while a broker starts or restarts,
        and the process dies with SIGSEGV. A consumer client has the handle: it asks for
        the coordinator again and retries. It never subscribes, so it never joins the group."""
        reader = Consumer({**self._common, "group.id": group, "enable.auto.commit": False})
        try:
            deadline = self._deadline()
            while True:
                try:
                    (tp,) = reader.committed([TopicPartition(topic, 0)], timeout=self._timeout_s)
                    break
                except KafkaException as exc:
                    if not _transient(exc.args[0]) or time.monotonic() > deadline:
                        raise self._unavailable(f"reading offsets of {group}", exc) from exc
                time.sleep(POLL_S)
        finally:
            reader.close()
        if tp.error is not None:
            raise BackendUnavailable(backend=self._backend, detail=f"reading offsets of {group}: {tp.error}")
        return tp.offset


class _Committer:
    """The consumer client that commits the offsets of one consumer group, kept for the
    KafkaLog's life (the applier commits every second).

    Not the admin client: once a broker restarted, its offset commits got no answer at all
    (librdkafka 2.16), so a daemon's consumer offset, which retention waits for, stayed
    where it was until the process ended. A consumer client asks for the coordinator again.
    It never subscribes, so it never joins the group. Commits are asynchronous, so that
    the caller's deadline bounds each (a synchronous one waits up to 45 s for a coordinator);
    their answers come in order, so a late answer to an abandoned commit is told apart."""

    def __init__(self, common: dict, group: str):
        self._lock = threading.Lock()
        self._sent = self._answered = 0
        self._last: tuple[KafkaError | None, list[TopicPartition]] = (None, [])
        self._client = Consumer({**common, "group.id": group, "enable.auto.commit": False,
                                 "on_commit": self._answer})

    def _answer(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        self._answered += 1
        self._last = (error, partitions)

    def commit(self, where: TopicPartition, deadline: float) -> list[TopicPartition]:
        """The committed partitions; KafkaException for an error, TimeoutError past ``deadline``."""
        with self._lock:
            self._client.commit(offsets=[where], asynchronous=True)
            self._sent += 1
            while self._answered < self._sent:
                if time.monotonic() > deadline:
                    raise TimeoutError
                self._client.poll(POLL_S)  # serves on_commit
            error, partitions = self._last
            if error is not None:
                raise KafkaException(error)
            return partitions

    def close(self) -> None:
        self._client.close()


def _transient(error: KafkaError) -> bool:
    return error.retriable() or error.code() in _TRANSIENT


def _valid_name(name: str) -> bool:
    try:
        check_partition_name(name)
        return True
    except InvalidName:
        return False


def _header(message: Message, name: str) -> bytes | None:
    for key, value in message.headers() or ():
        if key == name:
            return value
    return None


def _int_header(partition: str, message: Message, name: str) -> int:
    raw = _header(message, name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise CorruptRecord(reason=f"partition {partition} offset {message.offset()}: "
                            f"header {name} is missing or not a number") from None


def _timestamp_ns_of_kafka(message: Message) -> int:
    return message.timestamp()[1] * _NS_PER_MS


def _timestamp_ns(message: Message) -> int:
    """The ns timestamp of one of our records, or Kafka's ms one for a record without it."""
    raw = _header(message, HEADER_TIME)
    kind, ms = message.timestamp()
    if raw is None:
        return ms * _NS_PER_MS
    try:
        stamp = int(raw)
    except ValueError:
        stamp = None
    if stamp is None or (kind == TIMESTAMP_CREATE_TIME and stamp // _NS_PER_MS != ms):
        raise CorruptRecord(reason=f"offset {message.offset()}: header {HEADER_TIME} does not match "
                            "the record's timestamp")
    return stamp


def _bytes_before(partition: str, message: Message) -> int:
    return _int_header(partition, message, HEADER_BYTES_BEFORE)


def _payload_len(message: Message) -> int:
    return max(0, len(message.value() or b"") - frame.HEADER_LEN)


def _record(partition: str, message: Message) -> LogRecord:
    try:
        payload = frame.unseal(message.value() or b"")
        stamp = _timestamp_ns(message)
    except CorruptRecord as exc:
        raise CorruptRecord(reason=f"partition {partition} offset {message.offset()}: {exc.params['reason']}") from exc
    return LogRecord(message.offset(), stamp, payload)
