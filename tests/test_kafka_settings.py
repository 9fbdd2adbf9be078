"""The Kafka log as config.toml sets it up: client properties (here SASL/PLAIN against the
test broker's SASL_PLAINTEXT listener, tools/kafka_broker.py), a topic prefix of the
installation's own, and the errors a bad setting gets (exit 2, a message naming it)."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from datatether.engine import codec
from datatether.engine.events import Event, Write
from datatether.engine.log_kafka import MAX_RECORD_BYTES, KafkaLog
from datatether.engine.settings import Settings
from datatether.tools import kafka_broker as broker_tool
from tests.daemon_helpers import dt
from tests.kafka_fixture import unique_prefix

pytestmark = pytest.mark.kafka


def configured(tmp_path: Path, bootstrap: str, **lines: str) -> Path:
    """A state directory whose config.toml holds ``log`` and ``lines`` (TOML text each)."""
    state = tmp_path / "state"
    state.mkdir()
    body = "".join(f"{key} = {value}\n" for key, value in lines.items())
    (state / "config.toml").write_text(f'log = "{bootstrap}"\nkafka_timeout_s = 5\n{body}')
    return state


def sasl(password: str) -> str:
    return ('{ "security.protocol" = "SASL_PLAINTEXT", "sasl.mechanism" = "PLAIN", '
            f'"sasl.username" = "{broker_tool.SASL_USER}", "sasl.password" = "{password}" }}')


def topics(bootstrap: str) -> set[str]:
    return set(AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=10).topics)


def test_sasl_properties_and_topic_prefix_from_the_config_file(kafka_broker, tmp_path):
    prefix = f"site{uuid.uuid4().hex[:6]}."
    state = configured(tmp_path, kafka_broker.sasl_bootstrap, kafka_properties=sasl(broker_tool.SASL_PASSWORD),
                       kafka_topic_prefix=f'"{prefix}"')
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("through an authenticated listener\n")
    done = dt("mirror", str(src), str(tmp_path / "dst"), "--json", state=state, check=True)
    assert (tmp_path / "dst" / "a.txt").read_text() == "through an authenticated listener\n"
    connection = json.loads(done.stdout)["connection"]
    first = json.loads(dt("tail", connection, "--from", "0", "--json", state=state, check=True)
                           .stdout.splitlines()[0])
    assert first["op"] == "MirrorStart"
    mine = {t for t in topics(kafka_broker.bootstrap) if t.startswith(prefix)}
    assert len(mine) == 1 and next(iter(mine)).startswith(f"{prefix}conn-")


def test_a_wrong_password_is_an_error_not_a_hang(kafka_broker, tmp_path):
    state = configured(tmp_path, kafka_broker.sasl_bootstrap, kafka_properties=sasl("wrong"))
    (tmp_path / "src").mkdir()
    done = dt("mirror", str(tmp_path / "src"), str(tmp_path / "dst"), state=state, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "unavailable" in done.stderr and "Authentication failed" in done.stderr, done.stderr


@pytest.mark.parametrize(("lines", "says"), [
    ({"kafka_properties": '{ "no.such.property" = "1" }'}, 'No such configuration property: "no.such.property"'),
    ({"kafka_properties": '{ "security.protocol" = "CARRIER_PIGEON" }'}, "security.protocol"),
    ({"kafka_properties": '{ "acks" = "1" }'}, "acks cannot be set"),
    ({"kafka_properties": '{ "enable.idempotence" = false }'}, "enable.idempotence cannot be set"),
    ({"kafka_topic_prefix": '"two words"'}, "kafka_topic_prefix"),
])
def test_bad_kafka_settings_exit_2_naming_the_setting(kafka_broker, tmp_path, lines, says):
    state = configured(tmp_path, kafka_broker.bootstrap, **lines)
    done = dt("tail", "1", state=state, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "bad setting" in done.stderr and says in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_a_write_buffer_larger_than_a_kafka_record_is_refused(kafka_broker, tmp_path):
    """A Write above the Kafka record limit is refused by the broker on every append (a gap,
    then a remirror, each time a file is recreated): the setting is refused up front, and
    the largest Write it allows fits in one record."""
    state = configured(tmp_path, kafka_broker.bootstrap, max_write_buffer=32 << 20)
    done = dt("tail", "1", state=state, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "bad setting" in done.stderr and "max_write_buffer" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    largest = Settings.parse({"log": kafka_broker.bootstrap, "max_write_buffer": MAX_RECORD_BYTES}).max_write_buffer
    event = Event(Write("d/" + "n" * 250, 0, os.urandom(largest)), time.time_ns())
    with KafkaLog(kafka_broker.bootstrap, topic_prefix=unique_prefix(), timeout_s=10) as log:
        log.ensure_partition("big")
        log.append("big", [codec.encode(event)])
        assert codec.decode(log.read("big", 0)[0].value) == event


def test_two_installations_on_one_topic_prefix_never_share_a_topic(kafka_broker, tmp_path):
    """Connection ids are per state directory: a second installation with the same prefix
    would make conn-1 too and append to the first one's topic, whose applier then applies
    the other installation's files to its own target. A new connection whose partition the
    log already holds is refused instead, naming the setting."""
    prefix = f'"{unique_prefix()}"'
    for name in ("one", "two"):
        (tmp_path / name / "src").mkdir(parents=True)
        (tmp_path / name / "src" / f"{name}.txt").write_text(f"only {name}\n")
    first, second = (configured(tmp_path / name, kafka_broker.bootstrap, kafka_topic_prefix=prefix)
                     for name in ("one", "two"))
    dt("mirror", str(tmp_path / "one" / "src"), str(tmp_path / "one" / "dst"), state=first, check=True)
    done = dt("mirror", str(tmp_path / "two" / "src"), str(tmp_path / "two" / "dst"), state=second, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "DT-E001" in done.stderr and "kafka_topic_prefix" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert json.loads(dt("status", "--json", state=second, check=True).stdout)["connections"] == []
    (tmp_path / "one" / "src" / "later.txt").write_text("later\n")
    dt("mirror", str(tmp_path / "one" / "src"), str(tmp_path / "one" / "dst"), state=first, check=True)
    assert sorted(p.name for p in (tmp_path / "one" / "dst").iterdir()) == ["later.txt", "one.txt"]
