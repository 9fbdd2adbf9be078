"""Kafka benchmarks (entries of bench/run.py's BENCHES), each on a broker of its own
(tools/kafka_broker.py) started in the work directory and stopped at the end:

  kafka-e2e  end-to-end replication through Kafka: `dt mirror` of a generated tree with
             `log = "<broker>"` (the scanner appends events to the connection's topic
             through the source queue, the applier reads them back and writes the target),
             next to raw confluent-kafka produce + consume of the very same record values
             (the topic's records copied out first) on the same broker. MB/s of tree data;
             the ratio is what the product costs over moving its bytes through Kafka. The
             same mirror on the embedded log is shown beside it (what Kafka itself costs).
  restore    `dt restore CONNECTION --at OFFSET --into DIR` of the whole tree (1 GB at full
             scale) from the Kafka log, replayed from offset 0 (no snapshot: the worst
             case), next to `cp -a` of the source tree.

Both trees are the same deterministic one (workloads.make_tree), generated once per scale.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import workloads
from datatether.engine.log_kafka import KafkaLog
from datatether.tools import kafka_broker

TREE_BYTES = 1_000_000_000  # at full scale
TREE_FILES = 10_000
RAW_TOPIC = "bench.raw"
_LEN = struct.Struct(">I")


def bench_e2e(work: Path, scale: float) -> list:
    from run import Row  # bench/run.py imports this module: import it back when called

    src = tree(work, scale)
    size = tree_bytes(src)
    with kafka_broker.start(work / "kafka-e2e-broker") as broker:
        mirrored = mirror(broker.bootstrap, src, work / "kafka-e2e-state", work / "kafka-e2e-dst")
        identical = same_tree(src, work / "kafka-e2e-dst")
        spool = work / "kafka-e2e-records"
        count, record_bytes = copy_out(broker.bootstrap, mirrored["topic"], spool)
        t_produce = raw_produce(broker.bootstrap, spool)
        t_consume = raw_consume(broker.bootstrap, count)
    embedded = mirror("embedded", src, work / "kafka-e2e-embedded-state", work / "kafka-e2e-embedded-dst")
    for leftover in ("kafka-e2e-broker", "kafka-e2e-state", "kafka-e2e-dst", "kafka-e2e-records",
                     "kafka-e2e-embedded-state", "kafka-e2e-embedded-dst"):
        remove(work / leftover)
    ours, theirs = size / 1e6 / mirrored["seconds"], size / 1e6 / (t_produce + t_consume)
    detail = f"{count} records, {record_bytes / 1e6:.0f} MB"
    return [
        Row(f"kafka-e2e dt mirror via Kafka (MB/s; {detail})", ours, theirs, "raw produce+consume", "MB/s",
            "ratio shown", None if identical else False),
        Row("kafka-e2e dt mirror via Kafka vs embedded log (MB/s)", ours, size / 1e6 / embedded["seconds"],
            "dt mirror, embedded log", "MB/s", "ratio shown", None),
        Row("kafka-e2e raw produce only (MB/s)", size / 1e6 / t_produce, None, "-", "MB/s", "shown", None),
        Row("kafka-e2e raw consume only (MB/s)", size / 1e6 / t_consume, None, "-", "MB/s", "shown", None),
    ]


def bench_restore(work: Path, scale: float) -> list:
    from run import Row, timed

    src = tree(work, scale)
    into, copy = work / "restore-into", work / "restore-cp"
    with kafka_broker.start(work / "restore-broker") as broker:
        state = work / "restore-state"
        mirrored = mirror(broker.bootstrap, src, state, work / "restore-dst")
        t_restore = timed([workloads.DT, "restore", mirrored["connection"], "--at", str(mirrored["applied_offset"]),
                           "--into", str(into), "--state", str(state)])
    t_cp = timed(["cp", "-a", str(src), str(copy)])
    identical = same_tree(src, into)
    for leftover in ("restore-broker", "restore-state", "restore-dst", "restore-into", "restore-cp"):
        remove(work / leftover)
    gb = tree_bytes(src) / 1e9
    return [Row(f"restore-at-offset {gb:.1f} GB tree, Kafka log (s)", t_restore, t_cp, "cp -a", "s",
                "time shown", None if identical else False)]


# -- the parts --------------------------------------------------------------------------------------

def tree(work: Path, scale: float) -> Path:
    """The benchmark tree of this scale, generated on first use (kept for the next bench)."""
    files, total = int(TREE_FILES * scale), int(TREE_BYTES * scale)
    src = work / f"kafka-tree-{files}-{total}"
    if not src.exists():
        partial = src.with_name(src.name + ".partial")
        remove(partial)
        workloads.make_tree(partial, files=files, total_bytes=total, seed=5)
        partial.rename(src)
    return src


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def mirror(log: str, src: Path, state: Path, dst: Path) -> dict:
    """`dt mirror SRC DST` with its log at ``log`` (settings.log): the command's JSON result,
    its wall time (process start to exit, as an operator sees it) and, on Kafka, the
    connection's topic."""
    state.mkdir(parents=True)
    (state / "config.toml").write_text(f'log = "{log}"\n')
    start = time.perf_counter()
    done = subprocess.run([workloads.DT, "mirror", str(src), str(dst), "--json", "--state", str(state)],
                          check=True, capture_output=True, text=True)
    result = json.loads(done.stdout)
    result["seconds"] = time.perf_counter() - start
    if log != "embedded":
        with KafkaLog(log) as kafka_log:
            (partition,) = kafka_log.partitions()  # a broker of its own: the only one
            result["topic"] = kafka_log.prefix + partition
    return result


def copy_out(bootstrap: str, topic: str, spool: Path) -> tuple[int, int]:
    """Every record value of ``topic`` into ``spool`` (length-prefixed): (records, bytes)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-copy", "enable.auto.commit": False})
    _, end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=30)
    consumer.assign([TopicPartition(topic, 0, 0)])
    count = total = 0
    with open(spool, "wb") as out:
        while count < end:
            for message in consumer.consume(10_000, timeout=1):
                if message.error():
                    raise RuntimeError(message.error())
                value = message.value()
                out.write(_LEN.pack(len(value)) + value)
                count += 1
                total += len(value)
    consumer.close()
    return count, total


def raw_produce(bootstrap: str, spool: Path) -> float:
    """Seconds to produce the spooled values to a new topic and have them acknowledged, with
    the settings the product's producer uses (idempotent, acks=all, zstd)."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(RAW_TOPIC, 1, -1, config={"max.message.bytes": str(17 << 20)})])[RAW_TOPIC].result()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all",
                         "compression.type": "zstd", "linger.ms": 5, "message.max.bytes": 17 << 20})
    start = time.perf_counter()
    with open(spool, "rb") as f:
        while header := f.read(_LEN.size):
            value = f.read(_LEN.unpack(header)[0])
            while True:
                try:
                    producer.produce(RAW_TOPIC, value)
                    break
                except BufferError:
                    producer.poll(0.01)
    if producer.flush(300) != 0:
        raise RuntimeError("raw produce did not complete")
    return time.perf_counter() - start


def raw_consume(bootstrap: str, count: int) -> float:
    """Seconds to read ``count`` records of the raw topic from the beginning."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "bench-raw", "enable.auto.commit": False,
                         "fetch.max.bytes": 64 << 20, "max.partition.fetch.bytes": 32 << 20})
    start = time.perf_counter()
    consumer.assign([TopicPartition(RAW_TOPIC, 0, 0)])
    seen = 0
    while seen < count:
        for message in consumer.consume(10_000, timeout=1):
            if message.error():
                raise RuntimeError(message.error())
            seen += 1
    elapsed = time.perf_counter() - start
    consumer.close()
    return elapsed


def same_tree(a: Path, b: Path) -> bool:
    return subprocess.run(["diff", "-rq", str(a), str(b)], stdout=subprocess.DEVNULL).returncode == 0


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
