"""The session's real Kafka broker (tools/kafka_broker.py), shared by every Kafka test.

tests/conftest.py imports ``kafka_broker`` so the fixture is defined once for the whole
suite: the broker starts on first use and stops when the session ends. Crash tests may
``kill()`` and ``restart()`` it; it keeps its port, so clients of other tests reconnect.
Without Java and Maven the Kafka tests skip locally and fail in CI (``need``).
"""

from __future__ import annotations

import shutil
import struct
import uuid
from pathlib import Path

import pytest

from datatether.tools import kafka_broker as broker_tool

INSTALL_HINT = "tools/install.sh --test (Debian packages openjdk-17-jre-headless and maven)"


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory) -> broker_tool.Broker:
    from conftest import need  # conftest imports this module: import it late

    need(shutil.which("java") is not None and shutil.which("mvn") is not None,
         "Java and Maven (to run the Kafka test broker)", INSTALL_HINT)
    broker = broker_tool.start(tmp_path_factory.mktemp("kafka"), tied=True)  # gone with a killed run
    yield broker
    broker.stop()


def unique_prefix() -> str:
    """A topic prefix of its own, so a test sees only the partitions it made."""
    return f"t{uuid.uuid4().hex[:10]}."


def damage_batch(broker: broker_tool.Broker, topic: str, offset: int) -> None:
    """Flip the last byte of the record batch holding ``offset`` in the broker's segment file,
    as a failing disk would. The broker serves the page cache this write goes to, so the next
    fetch returns the damaged bytes. Batch layout (big-endian): baseOffset int64,
    batchLength int32 (bytes after this field), leaderEpoch int32, magic int8, crc uint32,
    attributes int16, lastOffsetDelta int32, ..."""
    folder = Path(broker.dir) / "data" / f"{topic}-0"
    segments = sorted(folder.glob("*.log"), key=lambda p: int(p.stem))
    segment = [s for s in segments if int(s.stem) <= offset][-1]
    data = segment.read_bytes()
    position = 0
    while position + 27 <= len(data):
        base, length = struct.unpack_from(">qi", data, position)
        last_delta = struct.unpack_from(">i", data, position + 23)[0]
        end = position + 12 + length
        if base <= offset <= base + last_delta:
            with open(segment, "r+b") as out:
                out.seek(end - 1)
                out.write(bytes((data[end - 1] ^ 0xFF,)))
            return
        position = end
    raise AssertionError(f"no batch holds offset {offset} in {segment}")
