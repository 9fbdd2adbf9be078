"""engine/history_export.py: the Parquet file round-trips every event, and the README's
query (bytes changed per directory per hour) gives the totals computed by hand."""

from __future__ import annotations

import datetime as dt
import json
from collections import defaultdict

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from history_helpers import SECOND, T0, append, create

from datatether.engine import events as ev
from datatether.engine import history
from datatether.engine.errors import DtError
from datatether.engine.history_export import SCHEMA, export_parquet
from datatether.engine.log_embedded import EmbeddedLog

P = "conn-7"
HOUR = 3600 * SECOND


def bytes_per_dir_per_hour(table: pa.Table) -> dict[tuple[str, int], int]:
    """The README's query, in pyarrow.compute (DuckDB: GROUP BY dir, date_trunc('hour', time))."""
    hour = pc.floor_temporal(table["time"], unit="hour")
    grouped = (pa.table({"dir": table["dir"], "hour": hour, "bytes": table["bytes"]})
               .group_by(["dir", "hour"]).aggregate([("bytes", "sum")]))
    return {(d, h.value): b for d, h, b in zip(grouped["dir"].to_pylist(), grouped["hour"],
                                                  grouped["bytes_sum"].to_pylist())}


@pytest.fixture
def log(tmp_path):
    with EmbeddedLog(tmp_path / "log") as opened:
        opened.ensure_partition(P)
        yield opened


def workload(log, partition: str = P) -> list[tuple[int, str, int]]:
    """Writes of known sizes in three directories over three hours: (time, path, bytes)."""
    plan = []
    dirs = ["", "logs", "logs/2026", "data"]
    for n in range(120):
        d = dirs[n % 4]
        path = f"{d}/f{n % 5}.bin".lstrip("/")
        t = T0 + n * 90 * SECOND  # three hours
        size = (n * 37) % 500 + 1
        append(log, partition, ev.Write(path, 0, b"\x00" * size), t)
        plan.append((t, path, size))
    append(log, partition, ev.Rename("logs/f1.bin", "data/f1.bin"), T0 + 4 * HOUR)
    append(log, partition, create("data"), T0 + 4 * HOUR)
    return plan


def test_round_trip_one_row_per_event(log, tmp_path):
    workload(log)
    out = tmp_path / "h.parquet"
    rows = export_parquet(history.read(log, P, 0), out, "web", batch_rows=16)
    assert rows == log.end_offset(P) == 122
    meta = pq.ParquetFile(out).metadata
    assert meta.num_row_groups == 8  # written in batches, never all at once
    table = pq.read_table(out)
    assert table.schema.equals(SCHEMA)
    expected = list(history.read(log, P, 0))
    assert table["offset"].to_pylist() == [h.offset for h in expected]
    assert [t.value for t in table["time"]] == [h.time_ns for h in expected]
    assert table["operation"].to_pylist() == [h.op for h in expected]
    assert table["bytes"].to_pylist() == [h.bytes for h in expected]
    assert set(table["connection"].to_pylist()) == {"web"}
    rename = table.slice(120, 1).to_pylist()[0]
    assert (rename["path"], rename["path2"], rename["dir"]) == ("logs/f1.bin", "data/f1.bin", "logs")
    assert table.slice(0, 1).to_pylist()[0]["dir"] == "."
    assert table["time"].type.tz == "UTC"
    first = table.slice(0, 1).to_pylist()[0]["time"]
    assert first == dt.datetime(2026, 3, 1, 10, tzinfo=dt.timezone.utc)


def test_bytes_changed_per_directory_per_hour(log, tmp_path):
    plan = workload(log)
    out = tmp_path / "h.parquet"
    export_parquet(history.read(log, P, 0), out, "web")
    expected: dict[tuple[str, int], int] = defaultdict(int)
    for t, path, size in plan:
        expected[(path.rpartition("/")[0] or ".", t - t % HOUR)] += size
    expected[("logs", T0 + 4 * HOUR)] += 0  # the rename moves no bytes
    expected[(".", T0 + 4 * HOUR)] += 0  # creating "data" happens in the root
    got = bytes_per_dir_per_hour(pq.read_table(out))
    assert got == dict(expected)
    assert len({h for _, h in got}) == 4


def test_a_range_and_undecodable_names(log, tmp_path):
    raw = "caf\udce9/x"  # b"caf\xe9/x" from os.fsdecode
    append(log, P, create(raw), T0)
    append(log, P, ev.Write(raw, 0, b"abc"), T0 + SECOND)
    append(log, P, ev.Write("other", 0, b"abcdef"), T0 + 2 * SECOND)
    out = tmp_path / "h.parquet"
    first, stop = history.range_for(log, P, [history.Point(offset=1), history.Point(offset=1)])
    assert export_parquet(history.read(log, P, first, stop), out, "c") == 1
    row = pq.read_table(out).to_pylist()[0]
    assert (row["offset"], row["path"], row["dir"], row["bytes"]) == (1, "caf\\xe9/x", "caf\\xe9", 3)


def test_a_failed_export_leaves_no_file(log, tmp_path):
    workload(log)
    out = tmp_path / "h.parquet"

    def broken():
        yield from history.read(log, P, 0, 5)
        raise RuntimeError("reader died")

    with pytest.raises(RuntimeError):
        export_parquet(broken(), out, "c", batch_rows=2)
    assert list(tmp_path.glob("*.parquet*")) == [] and list(tmp_path.glob(".h.parquet*")) == []


def test_a_directory_or_a_missing_folder_is_named_as_given(log, tmp_path):
    workload(log)
    for out, message in [(tmp_path, f"{tmp_path} is a directory"),
                         (tmp_path / "no" / "h.parquet", f"folder for the Parquet file not found: {tmp_path / 'no'}")]:
        with pytest.raises(DtError) as info:
            export_parquet(history.read(log, P, 0, 5), out, "c")
        assert info.value.exit_code == 2 and message in info.value.message
    assert list(tmp_path.parent.glob(f".{tmp_path.name}*")) == []


# -- dt history export, on both backends -----------------------------------------------

from history_helpers import StreamWorld, backends  # noqa: E402
from history_helpers import dt as run_dt  # noqa: E402


@backends()
def test_dt_history_export(tmp_path, backend, request):
    w = StreamWorld(tmp_path, backend, request)
    try:
        plan = workload(w.log, w.partition)
        out = tmp_path / "web.parquet"
        done = json.loads(run_dt("history", "export", "web", "--parquet", out, "--json", state=w.state).stdout)
        assert done["rows"] == 122
        table = pq.read_table(out)
        assert set(table["connection"].to_pylist()) == {"web"}
        expected: dict[tuple[str, int], int] = defaultdict(int)
        for t, path, size in plan:
            expected[(path.rpartition("/")[0] or ".", t - t % HOUR)] += size
        got = {k: v for k, v in bytes_per_dir_per_hour(table).items() if v}
        assert got == dict(expected)
        part = tmp_path / "part.parquet"
        run_dt("history", "export", "web", "--parquet", part, "--between", "10", "2026-03-01T10:30:00Z",
           "--path", "logs", state=w.state)
        rows = pq.read_table(part).to_pylist()
        assert {r["dir"] for r in rows} == {"logs", "logs/2026"}
        assert [r["offset"] for r in rows] == [n for n in range(10, 21) if n % 4 in (1, 2)]
    finally:
        w.close()
