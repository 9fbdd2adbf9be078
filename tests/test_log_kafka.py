"""KafkaLog: the Log contract against a real broker (tests/kafka_fixture.py), plus what only
Kafka brings: a broker killed mid-stream, damage seen through another producer, records
other Kafka tools can decode, and an unreachable cluster."""

from __future__ import annotations

import threading
import time

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from contract.log_contract import READ_AHEAD_S, LogContract, values
from kafka_fixture import damage_batch, unique_prefix

from datatether.engine import frame
from datatether.engine.errors import BackendUnavailable, CorruptRecord, InvalidName
from datatether.engine.log_kafka import EVENT_SCHEMA, HEADER_SCHEMA, HEADER_TIME, KafkaLog
from datatether.engine.retention import apply_retention
from datatether.tools.kafka_broker import free_port

pytestmark = pytest.mark.kafka


class TestKafkaLogContract(LogContract):
    @pytest.fixture
    def make_log(self, kafka_broker):
        self.broker = kafka_broker
        prefix = unique_prefix()
        return lambda: KafkaLog(kafka_broker.bootstrap, topic_prefix=prefix)

    def corrupt(self, log, partition, offset):
        damage_batch(self.broker, log.prefix + partition, offset)


@pytest.fixture
def log(kafka_broker):
    with KafkaLog(kafka_broker.bootstrap, topic_prefix=unique_prefix()) as opened:
        opened.ensure_partition("p")
        yield opened


def produce_raw(log: KafkaLog, partition: str, value: bytes, headers=None) -> None:
    """Write one record as any other Kafka producer could (no KafkaLog involved)."""
    producer = Producer({"bootstrap.servers": log.bootstrap})
    producer.produce(log.prefix + partition, value=value, headers=headers)
    assert producer.flush(30) == 0


def test_broker_killed_between_appends_loses_nothing(kafka_broker, log):
    """SIGKILL the broker, call the log while it is down (long enough for the clients to
    see "transport failure" and forget the topic's leader), restart it: every call waits
    for the broker and answers; every record is there once, offsets continue without a gap,
    and committed offsets survive. An append waits as long as its delivery may, even when
    that is longer than the log's timeout for other calls."""
    log.append("p", values(5, "before"))
    log.commit("p", "applier", 3)
    impatient = KafkaLog(kafka_broker.bootstrap, topic_prefix=log.prefix, timeout_s=1, delivery_timeout_s=120)
    assert impatient.end_offset("p") == 5
    kafka_broker.kill()
    answers = {}
    fresh = KafkaLog(kafka_broker.bootstrap, topic_prefix=log.prefix)  # no cached metadata

    def call(name, what):
        try:
            answers[name] = what()
        except Exception as exc:  # noqa: BLE001 - the test reports it below
            answers[name] = exc
    calls = {  # the idempotent producer holds the batch until the broker is back, then sends it once
        "append": lambda: impatient.append("p", values(3, "down")),
        "end_offset": lambda: fresh.end_offset("p"),
        "partitions": fresh.partitions,
        "offset_for_time": lambda: fresh.offset_for_time("p", 0),
    }
    threads = [threading.Thread(target=call, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    time.sleep(3)
    kafka_broker.restart()
    for thread in threads:
        thread.join(120)
    fresh.close()
    impatient.close()
    assert answers["append"] == 5, answers
    assert answers["end_offset"] in (5, 8), answers
    assert answers["partitions"] == ["p"], answers
    assert answers["offset_for_time"] == 0, answers
    assert log.append("p", values(2, "after")) == 8
    records = log.read("p", 0)
    assert [r.offset for r in records] == list(range(10))
    assert [r.value for r in records] == values(5, "before") + values(3, "down") + values(2, "after")
    assert log.committed("p", "applier") == 3


def test_commits_go_on_after_the_broker_restarts(kafka_broker, log):
    """The applier commits its consumer offset every few seconds through the same KafkaLog
    for the daemon's whole life; retention waits for that offset. A commit after the
    broker restarted must succeed (once the broker is back), not fail until the process
    ends."""
    log.append("p", values(4, "v"))
    with KafkaLog(kafka_broker.bootstrap, topic_prefix=log.prefix, timeout_s=5) as applier:
        applier.commit("p", "applier", 0)
        kafka_broker.kill()
        kafka_broker.restart()
        deadline = time.monotonic() + 60
        while True:
            try:
                applier.commit("p", "applier", 2)
                break
            except BackendUnavailable:
                assert time.monotonic() < deadline, "no commit succeeded within 60 s of the restart"
    assert log.committed("p", "applier") == 2
    assert log.consumers("p") == {"applier": 2}


def test_a_damaged_value_from_another_producer_raises_corrupt_record(log):
    log.append("p", values(2))
    sealed = bytearray(frame.seal(b"payload"))
    sealed[-1] ^= 0x01
    produce_raw(log, "p", bytes(sealed))
    assert [r.value for r in log.read("p", 0, max_records=2)] == values(2)
    with pytest.raises(CorruptRecord, match="offset 2"):
        log.read("p", 2)
    with pytest.raises(CorruptRecord):
        log.read("p", 0)


def test_a_foreign_record_is_corrupt_and_does_not_block_appends(log):
    log.append("p", values(1))
    produce_raw(log, "p", b"not a datatether frame")
    with pytest.raises(CorruptRecord):
        log.read("p", 1)
    assert log.append("p", [b"next"]) == 2
    assert log.read("p", 2)[0].value == b"next"


def test_a_damaged_batch_on_the_broker_disk_fails_its_records_only(kafka_broker, log):
    log.append("p", values(3, "a"))
    log.append("p", values(2, "b"))  # a second batch
    damage_batch(kafka_broker, log.prefix + "p", 1)
    with pytest.raises(CorruptRecord, match="damaged"):
        log.read("p", 2)
    assert [r.value for r in log.read("p", 3)] == values(2, "b")


def test_batches_before_a_damaged_one_stay_readable_after_reading_ahead(kafka_broker, log):
    """The reader fetches ahead after a read; meeting a damaged batch (and the garbage the
    client may read after it) must not spoil later reads of the batches before it."""
    log.append("p", values(3, "a"))
    log.append("p", values(3, "b"))  # offsets 3-5, one batch
    log.append("p", values(2, "c"))
    damage_batch(kafka_broker, log.prefix + "p", 4)
    assert [r.value for r in log.read("p", 0, max_records=1)] == values(1, "a")
    time.sleep(READ_AHEAD_S)
    for _ in range(3):  # each read fetches ahead into the damage again
        assert [r.value for r in log.read("p", 0, max_records=3)] == values(3, "a")
    with pytest.raises(CorruptRecord, match="offset 4 is damaged"):  # read from inside the batch
        log.read("p", 4)
    assert [r.value for r in log.read("p", 6)] == values(2, "c")
    assert [r.value for r in log.read("p", 1, max_records=2)] == values(3, "a")[1:]


def test_records_decode_with_a_plain_kafka_consumer(log):
    """Other tools tail the stream: the value is a frame, the headers say what it holds."""
    log.append("p", [b"event bytes"], timestamp_ns=1_234_567_891)
    consumer = Consumer({"bootstrap.servers": log.bootstrap, "group.id": "outside-tool",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(log.prefix + "p", 0, 0)])
        message = consumer.consume(1, timeout=30)[0]
    finally:
        consumer.close()
    headers = dict(message.headers())
    assert frame.unseal(message.value()) == b"event bytes"
    assert headers[HEADER_SCHEMA] == EVENT_SCHEMA.encode()
    assert int(headers[HEADER_TIME]) == 1_234_567_891
    assert message.timestamp()[1] == 1_234


def test_consumers_are_kafka_consumer_groups(log):
    """Kafka's own tools see each consumer's position (next offset = committed + 1)."""
    log.append("p", values(4))
    log.commit("p", "applier", 2)
    consumer = Consumer({"bootstrap.servers": log.bootstrap, "group.id": log.prefix + "p:applier"})
    try:
        [position] = consumer.committed([TopicPartition(log.prefix + "p", 0)], timeout=30)
    finally:
        consumer.close()
    assert position.offset == 3


def test_a_new_writer_continues_the_byte_counters_from_the_topic(log):
    log.append("p", [b"a" * 10, b"b" * 20])
    log.append("p", [b"c" * 30])
    log.truncate_before("p", 1)
    reopened = KafkaLog(log.bootstrap, topic_prefix=log.prefix)
    try:
        reopened.append("p", [b"d" * 5])
        assert reopened.size("p") == (55, 3)
    finally:
        reopened.close()


def test_an_unreachable_cluster_is_backend_unavailable():
    with KafkaLog(f"127.0.0.1:{free_port()}", timeout_s=1) as unreachable:
        with pytest.raises(BackendUnavailable):
            unreachable.end_offset("p")
        # An admin request without an answer says so (the first thing dt mirror asks).
        with pytest.raises(BackendUnavailable, match=r"creating topic dt\.p: no answer within 1 s$"):
            unreachable.ensure_partition("p")


def test_names_kafka_would_confuse_are_invalid(log):
    """Kafka treats '.' and '_' alike in topic names (metrics); the second name is refused."""
    log.ensure_partition("a.b")
    with pytest.raises(InvalidName, match="collides"):
        log.ensure_partition("a_b")
    assert log.partitions() == ["a.b", "p"]


def test_the_product_retention_policy_runs_on_kafka(log):
    """engine/retention.py drives truncate_before: consumed history outside the window goes,
    the unconsumed queue stays, whatever its age."""
    old = values(4, "old", size=100)
    log.append("p", old, timestamp_ns=1_000_000_000)
    log.append("p", values(2, "new"))
    log.commit("p", "applier", 1)
    assert apply_retention(log, "p", window_s=3600, max_bytes=None) == 2
    assert log.size("p") == (sum(map(len, old[2:] + values(2, "new"))), 4)
