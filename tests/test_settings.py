"""engine/settings.py: the config file is validated on load; a bad value names its field."""

from __future__ import annotations

import pickle

import pytest

from datatether.engine.errors import SettingsError
from datatether.engine.settings import Settings
from datatether.engine.states import MirrorMode

from daemon_helpers import dt


def test_values_from_the_file_and_overrides_typed_as_declared(tmp_path):
    (tmp_path / "config.toml").write_text('retry_delay_s = 2\nauto_remirror_mode = "diff"\n'
                                          'kafka_properties = { "linger.ms" = 5, "security.protocol" = "SSL" }\n')
    s = Settings.load(tmp_path, memory_queue_limit_mb=64, disk_queue_limit_mb=None)
    assert s.retry_delay_s == 2.0 and isinstance(s.retry_delay_s, float)
    assert s.auto_remirror_mode is MirrorMode.DIFF
    assert s.kafka_properties == {"linger.ms": 5, "security.protocol": "SSL"}
    assert s.memory_queue_limit_mb == 64 and s.disk_queue_limit_mb is None  # None: not overridden
    assert Settings.load(tmp_path / "no-such-dir") == Settings()


@pytest.mark.parametrize(("values", "says"), [
    ({"memory_queue_limit_mb": 8}, "memory_queue_limit_mb: Expected `int` >= 32"),
    ({"mirror_packet_size": 64 << 20}, "mirror_packet_size: Expected `int` <= 16777216"),
    ({"retry_delay_s": 0}, "retry_delay_s: Expected `float` > 0"),
    ({"retry_delay_s": "soon"}, "retry_delay_s: Expected `float`, got `str`"),
    ({"retry_delay_s": float("inf")}, "retry_delay_s: Expected `float` <= 86400"),  # no wait takes it
    ({"checksum_all": 1}, "checksum_all: Expected `bool`, got `int`"),
    ({"history_window_s": True}, "history_window_s: Expected `int`, got `bool`"),
    ({"orphans_action": "shred"}, "orphans_action: Invalid enum value 'shred'"),
    ({"auto_remirror_mode": "fastest"}, "auto_remirror_mode: Invalid enum value 'fastest'"),
    ({"kafka_topic_prefix": "two words"}, "kafka_topic_prefix: Expected `str` matching regex"),
    ({"log": "kafka.example"}, 'log: must be "embedded" or a Kafka bootstrap address'),
    ({"kafka_properties": {"acks": "1"}}, "kafka_properties: acks cannot be set"),
    ({"no_such_setting": 1}, "unknown field `no_such_setting`"),
])
def test_a_bad_value_is_a_settings_error_naming_the_field(values, says):
    with pytest.raises(SettingsError) as caught:
        Settings.parse(values)
    assert says in str(caught.value), str(caught.value)


def test_immutable_replaceable_and_picklable_for_the_applier_process():
    s = Settings()
    with pytest.raises(AttributeError):
        s.retry_delay_s = 1.0
    changed = s.replace(task_commands=False)
    assert changed.task_commands is False and s.task_commands is True
    assert pickle.loads(pickle.dumps(changed)) == changed


@pytest.mark.parametrize(("text", "says"), [
    ("memory_queue_limit_mb = 1\n", "memory_queue_limit_mb"),
    ("retry_delay_s = \n", "config.toml"),  # not TOML at all
    (b"retry_delay_s = '\xff'\n", "config.toml"),  # not UTF-8
])
def test_dt_exits_2_with_a_message_on_a_bad_config_file(tmp_path, text, says):
    state = tmp_path / "state"
    state.mkdir()
    path = state / "config.toml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    (tmp_path / "src").mkdir()
    done = dt("mirror", str(tmp_path / "src"), str(tmp_path / "dst"), state=state)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "bad setting" in done.stderr and says in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "dst").exists()  # nothing started
