"""Verification: compare a source with its target, report, and optionally remirror.

A verification is a mirror pass (engine/mirror.py) that reports every difference to a
``VerifyLog``: with ``remirror`` the pass also sends what differs, through the log like
any mirror; without, it is a dry run that appends nothing. So "different" has one
definition (``mirror.plan``) for mirror and verification alike.

Options, as the reference names them: *verify only* or *remirror*; *only if the
source's date is newer* (narrows what is remirrored; every difference is still
reported); *block checksum* (every file's blocks are compared, so a change that keeps
size and time is found, and the report names the differing blocks). As in the
reference, the log shows each file as it was before any remirror.

The verification log of a replication set is ``<state>/<set> <settings.verify_log_name>``:
each verification is framed by BEGIN and END markers (time, set, source, target,
options), one line per differing object says what differs, and TOTALS close it. The
file never grows past ``settings.verify_log_max_bytes`` (from the first line that does
not fit on nothing is written, the END marker included); ``settings.verify_log_append`` keeps earlier
verifications, otherwise each one starts the file afresh. Paths are written as JSON
strings (newlines and other control characters escaped; non-UTF-8 bytes as themselves).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from . import logs
from .log import Log
from .mirror import Difference, Mirror, MirrorStats
from .pathlocks import PathLocks
from .settings import Settings
from .states import MirrorMode
from .tree import Tree

log = logs.get(__name__)


@dataclass
class VerifyResult:
    set_name: str
    differences: list[Difference] = field(default_factory=list)
    stats: MirrorStats = field(default_factory=MirrorStats)
    remirrored: bool = False
    log_path: str = ""

    @property
    def identical(self) -> bool:
        return not self.differences and not self.stats.problems

    def totals(self) -> dict:
        s = self.stats
        return {"objects": s.objects, "different": len(self.differences), "problems": len(s.problems),
                "examined_bytes": s.processed_bytes, "remirrored_bytes": s.sent_bytes if self.remirrored else 0}


class VerifyLog:
    """The verification log of one replication set (format in the module docstring)."""

    def __init__(self, path: str | Path, max_bytes: int, append: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab" if append else "wb")
        self._size = self._f.tell()
        self._max = max_bytes
        self.full = False

    def line(self, text: str) -> None:
        """Write ``text`` as a line, unless the log is full: once a line did not fit no
        later one is written, so a log missing a line never ends with an END marker."""
        if self.full:
            return
        data = (text + "\n").encode("utf-8", "surrogateescape")
        if self._size + len(data) > self._max:
            log.warning("verification log full: no more lines written", msgid="DT-M010",
                        path=str(self.path), max_bytes=self._max)
            self.full = True
            return
        self._f.write(data)
        self._size += len(data)

    def close(self) -> None:
        self._f.close()


def _stamp() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def log_path(state_dir: str | Path, set_name: str, settings: Settings) -> Path:
    return Path(state_dir) / f"{set_name} {settings.verify_log_name}"


def verify(source: Tree, target: Tree, settings: Settings, *, set_name: str, state_dir: str | Path,
           checksum: bool = False, newer_only: bool = False, remirror: bool = False,
           event_log: Log | None = None, partition: str = "", locks: PathLocks | None = None,
           position_path: Path | None = None, link_map: Callable[[str], str] | None = None,
           progress: Callable[[MirrorStats], None] | None = None) -> VerifyResult:
    """Verify ``source`` against ``target`` and write the set's verification log.

    With ``remirror``, ``event_log``/``partition`` receive the mirror events of what differs
    (the caller runs the applier).
    """
    path = log_path(state_dir, set_name, settings)
    result = VerifyResult(set_name=set_name, remirrored=remirror, log_path=str(path))
    options = ",".join(n for n, on in (("checksum", checksum), ("newer", newer_only),
                                        ("remirror", remirror)) if on) or "verify-only"
    vlog = VerifyLog(path, settings.verify_log_max_bytes, settings.verify_log_append)
    try:
        vlog.line(f"=== BEGIN verification {_stamp()} set={json.dumps(set_name)} "
                  f"source={json.dumps(source.root)} target={json.dumps(target.root)} options={options}")

        def observe(diff: Difference) -> None:
            result.differences.append(diff)
            vlog.line(f"DIFF {_quote(diff.path or '.')} ({diff.kind.lower()}): {'; '.join(diff.details)}")

        mirror = Mirror(source, target, event_log, partition, settings, locks,
                        mode=MirrorMode.CHECKSUM_ALL if checksum else MirrorMode.DIFF,
                        newer_only=newer_only, position_path=position_path, progress=progress,
                        observer=observe, dry_run=not remirror, origin="verify", link_map=link_map)
        result.stats = mirror.run()
        for problem in result.stats.problems:
            vlog.line(f"PROBLEM {_quote(problem)}")
        totals = result.totals()
        vlog.line("=== TOTALS " + " ".join(f"{k}={v}" for k, v in totals.items()))
        vlog.line(f"=== END verification {_stamp()} set={json.dumps(set_name)} "
                  f"result={'identical' if result.identical else 'different'}")
    finally:
        vlog.close()
    log.info("verification finished", msgid="DT-M011", set=set_name, **result.totals())
    return result


def _quote(path: str) -> str:
    # json.dumps escapes control characters; surrogates (non-UTF-8 bytes) pass through
    # as themselves so the log names the real file.
    return json.dumps(path, ensure_ascii=False)
