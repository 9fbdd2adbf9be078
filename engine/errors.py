"""Errors users can see: each class has a message template, a message id and an exit code.

Exit codes are stable and documented in the README:
    0  success
    1  differences found (verify, orphans preview with orphans present)
    2  error: bad input, missing thing, refused operation, I/O failure
  130  interrupted (SIGINT)
A daemon never dies on one of these: it logs the message id and keeps serving.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class DtError(Exception):
    """Base of every error meant for a user. Subclasses set ``template`` and ``msgid``."""

    template = "{detail}"
    msgid = "DT-E000"
    exit_code = EXIT_ERROR

    def __init__(self, **params):
        self.params = params
        super().__init__(self.template.format(**params))

    @property
    def message(self) -> str:
        return str(self)

    def as_dict(self) -> dict:
        return {"error": self.msgid, "message": self.message}


class UsageError(DtError):
    template = "{detail}"
    msgid = "DT-E001"


class NotFound(DtError):
    template = "{what} not found: {name}"
    msgid = "DT-E002"


class AlreadyExists(DtError):
    template = "{what} already exists: {name}"
    msgid = "DT-E003"


class StaleGeneration(DtError):
    """The generation a change was based on is not the set's (older: someone saved in
    between; newer: the caller's number is simply wrong)."""

    template = "replication set {name} is at generation {actual}, not {expected}: {why}"
    msgid = "DT-E004"

    def __init__(self, *, name: str, actual: int, expected: int):
        why = ("it was changed by someone else since; reload it and try again" if expected < actual
               else "that generation does not exist yet")
        super().__init__(name=name, actual=actual, expected=expected, why=why)


class InvalidName(DtError):
    template = "invalid name {name!r}: {reason}"
    msgid = "DT-E005"


class InvalidRule(DtError):
    template = "invalid rule {path!r}: {reason}"
    msgid = "DT-E006"


class CorruptRecord(DtError):
    template = "corrupt record: {reason}"
    msgid = "DT-E007"


class OffsetOutOfRange(DtError):
    template = "offset {offset} is outside the log ({start}..{end})"
    msgid = "DT-E008"


class PathEscapes(DtError):
    template = "refused path {path!r}: {reason}"
    msgid = "DT-E009"


class OutOfOrder(DtError):
    template = "event at offset {offset} is not the next one (expected {expected})"
    msgid = "DT-E010"


class Overlap(DtError):
    template = "{detail}"
    msgid = "DT-E011"


class SettingsError(DtError):
    template = "bad setting: {detail}"
    msgid = "DT-E012"


class QueueFull(DtError):
    template = "{queue} queue limit reached ({limit} bytes): connection needs a remirror"
    msgid = "DT-E013"


class BackendUnavailable(DtError):
    template = "{backend} is unavailable: {detail}"
    msgid = "DT-E014"


class InvalidEvent(DtError):
    """An event that can never be applied as it stands (not a transient failure)."""

    template = "event cannot be applied: {reason}"
    msgid = "DT-E015"


class NotAuthorized(DtError):
    """The control API refused a caller (DESIGN invariant 6, least privilege)."""

    template = "{who} may not {op}: {reason}"
    msgid = "DT-E016"


class AlreadyRunning(DtError):
    template = "{what} is already running (pid {pid}): {hint}"
    msgid = "DT-E017"


class OutsideHistory(DtError):
    """A point (offset or time) that tail, history or restore cannot reach: after the end of
    the log, or older than both the oldest snapshot and the oldest retained record."""

    template = "{point} is outside the reachable history: {reason} (reachable: {reachable})"
    msgid = "DT-E018"


class CaptureFailed(DtError):
    """A capture backend could not start or stop (mount refused, module missing...)."""

    template = "capture {backend} on {root} failed: {detail}"
    msgid = "DT-E019"


class ApplyFailed(DtError):
    """The target kept failing an event (full or read-only disk, I/O errors): the job gave
    up waiting, the target is Mirror Required and the events stay in the log."""

    template = "the target could not apply the events: {detail} (target data state: Mirror Required)"
    msgid = "DT-E020"


class VerifyIncomplete(DtError):
    """A verification finished but some objects could not be compared (unreadable, too
    long); without --remirror nothing was sent, so the target's state is unchanged."""

    template = "verification incomplete, {count} object(s) not compared: {shown}"
    msgid = "DT-E023"


class MirrorIncomplete(DtError):
    """A mirror finished but some objects could not be mirrored (unreadable, too long)."""

    template = "mirror incomplete, {count} object(s) not mirrored (target data state: Mirror Required): {shown}"
    msgid = "DT-E021"


class RestoreFailed(DtError):
    """Restore could not rebuild the state exactly (a corrupt or refused event on the way,
    the target directory failing): nothing is left in the destination."""

    template = "cannot restore {point}: {reason}"
    msgid = "DT-E022"
