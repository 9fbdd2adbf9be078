import pytest

from datatether.engine.connection import ConnectionStore, map_target
from datatether.engine.errors import AlreadyExists, CorruptRecord, InvalidName, NotFound, UsageError
from datatether.tools.cli import main


def test_create_get_list_delete_and_ids_are_never_reused(tmp_path):
    store = ConnectionStore(tmp_path / "state")
    a = store.create(name="web", set_name="web", source_root=str(tmp_path / "src"), target=str(tmp_path / "dst"))
    b = store.create(name="db", set_name="db", source_root=str(tmp_path / "src2"), target=str(tmp_path / "dst2"))
    assert (a.id, b.id) == (1, 2) and a.partition == "conn-1"
    assert store.get("web") == a and store.get(2) == b and store.get("2") == b
    assert [c.name for c in store.list()] == ["web", "db"]
    store.delete("db")
    c = store.create(name="db2", set_name="db", source_root=str(tmp_path / "src3"), target=str(tmp_path / "dst3"))
    assert c.id == 3
    assert ConnectionStore(tmp_path / "state").get("db2") == c  # durable


def test_bad_input_is_refused(tmp_path):
    store = ConnectionStore(tmp_path)
    src = str(tmp_path / "src")
    with pytest.raises(UsageError, match="inside the source"):
        store.create(name="x", set_name="s", source_root=src, target=src + "/replica")
    with pytest.raises(UsageError, match="inside the target"):
        store.create(name="x", set_name="s", source_root=src, target=str(tmp_path))
    with pytest.raises(InvalidName):
        store.create(name="bad name", set_name="s", source_root=src, target=str(tmp_path / "t"))
    store.create(name="x", set_name="s", source_root=src, target=str(tmp_path / "t"))
    with pytest.raises(AlreadyExists):
        store.create(name="x", set_name="s", source_root=src + "2", target=str(tmp_path / "t2"))
    with pytest.raises(UsageError, match="already sends"):
        store.create(name="y", set_name="s", source_root=src + "3", target=str(tmp_path / "t"))
    with pytest.raises(NotFound):
        store.get("nope")


def test_mappings():
    assert map_target("/srv/data", "/backup/d", "custom") == "/backup/d"
    assert map_target("/srv/data", "/backup", "all_to_one") == "/backup/srv/data"
    assert map_target("/srv/data", "/ignored", "one_to_one") == "/srv/data"
    with pytest.raises(UsageError):
        map_target("/a", "/b", "sideways")


@pytest.mark.parametrize("damage", [lambda b: b[:0], lambda b: b[:5], lambda b: b[:-1], lambda b: b + b"x",
                                    lambda b: b"\xff" * len(b)])
def test_a_damaged_connection_record_is_corrupt_never_half_read(tmp_path, damage):
    store = ConnectionStore(tmp_path)
    store.create(name="web", set_name="web", source_root=str(tmp_path / "src"), target=str(tmp_path / "dst"))
    [path] = store.dir.glob("*.avro")
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptRecord, match="1.avro: not a connection record"):
        store.list()


@pytest.mark.parametrize("damage", [b"", b"x", b"-1", b"\xff"])
def test_a_damaged_last_id_is_corrupt_and_never_lets_an_id_be_reused(tmp_path, damage):
    store = ConnectionStore(tmp_path)
    for name in ("a", "b"):
        store.create(name=name, set_name=name, source_root=str(tmp_path / name), target=str(tmp_path / f"{name}-dst"))
    store.delete("b")
    (store.dir / "last_id").write_bytes(damage)
    with pytest.raises(CorruptRecord, match="last_id"):
        store.create(name="c", set_name="c", source_root=str(tmp_path / "c"), target=str(tmp_path / "c-dst"))
    assert [c.name for c in store.list()] == ["a"]


@pytest.mark.parametrize("command", [["status"], ["set", "list"], ["set", "show", "web"]])
def test_a_state_path_that_is_a_regular_file_is_an_error_not_an_empty_state(tmp_path, capsys, command):
    state = tmp_path / "not-a-dir"
    state.write_text("x")
    assert main([*command, "--state", str(state)]) == 2
    err = capsys.readouterr().err
    assert "[DT-E100]" in err and "Not a directory" in err
    assert ConnectionStore(tmp_path / "absent").list() == []  # a state never used is empty, not an error
