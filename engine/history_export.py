"""History as a Parquet file: one row per event, for DuckDB, pandas or any Arrow reader.

Columns (``SCHEMA``)::

    offset      int64                 the event's offset in the connection's partition
    time        timestamp[ns, UTC]    the log's time of the event (engine/history.py)
    operation   string                event class name: Write, Create, Rename, ...
    path        string                first path the event names ('' for none); a block
                                      event's device
    path2       string, nullable      second path: a rename's destination, a link's target
    dir         string                parent directory of ``path`` ('.' at the set root),
                                      so per-directory queries need no string functions
    bytes       int64                 payload bytes the event carries (file or block data)
    connection  string                the connection's name

Paths that are not UTF-8 are written with ``\\xNN`` escapes for the undecodable bytes
(Parquet strings must be UTF-8). Rows are written in row groups of at most ``batch_rows``
events, and payloads are never kept, so memory stays bounded whatever the history size.

Bytes changed per directory per hour, in DuckDB::

    SELECT dir, date_trunc('hour', time) AS hour, sum(bytes) AS bytes
    FROM 'history.parquet' GROUP BY dir, hour ORDER BY hour, dir;
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from .durable import fsync_dir
from .errors import NotFound, UsageError
from .history import HistoryEvent, display_path

BATCH_ROWS = 50_000
SCHEMA = pa.schema([
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("time", pa.timestamp("ns", tz="UTC"), nullable=False),
    pa.field("operation", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("path2", pa.string()),
    pa.field("dir", pa.string(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("connection", pa.string(), nullable=False),
])


def _parent(path: str) -> str:
    return os.path.dirname(path) or "."


def export_parquet(events: Iterable[HistoryEvent], file: str | Path, connection: str,
                   batch_rows: int = BATCH_ROWS) -> int:
    """Write ``events`` to ``file`` (replaced atomically when complete); return the row count.

    A directory, or a file in a folder that does not exist, is refused before anything is
    written: the temporary file beside it would otherwise be the one the error names."""
    file = Path(file)
    if file.is_dir():
        raise UsageError(detail=f"{file} is a directory: name the Parquet file to write")
    if not file.parent.is_dir():
        raise NotFound(what="folder for the Parquet file", name=str(file.parent))
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    columns: dict[str, list] = {name: [] for name in SCHEMA.names}
    rows = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA, compression="zstd") as writer:
            for hev in events:
                paths = [display_path(p) for p in hev.paths()]
                first = paths[0] if paths else ""
                columns["offset"].append(hev.offset)
                columns["time"].append(hev.time_ns)
                columns["operation"].append(hev.op)
                columns["path"].append(first)
                columns["path2"].append(paths[1] if len(paths) > 1 else None)
                columns["dir"].append(_parent(first))
                columns["bytes"].append(hev.bytes)
                columns["connection"].append(connection)
                rows += 1
                if len(columns["offset"]) >= batch_rows:
                    _flush(writer, columns)
            _flush(writer, columns)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
        fsync_dir(file.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return rows


def _flush(writer: pq.ParquetWriter, columns: dict[str, list]) -> None:
    if not columns["offset"]:
        return
    writer.write_batch(pa.record_batch([pa.array(columns[f.name], f.type) for f in SCHEMA], schema=SCHEMA))
    for values in columns.values():
        values.clear()
