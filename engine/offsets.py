"""The one position type of the project: an offset within a connection's partition.

Offsets start at 0 and grow by exactly one per appended record. ``NO_OFFSET`` (-1) means
"nothing yet" (nothing applied, nothing committed). Compare offsets only through
``expect_next`` when order matters; format them with ``fmt`` so names and keys sort.
"""

from __future__ import annotations

from .errors import OutOfOrder

NO_OFFSET = -1


def fmt(offset: int) -> str:
    """Fixed-width, sortable text form (16 hex digits)."""
    return f"{offset:016x}"


def next_after(applied: int) -> int:
    return applied + 1


def expect_next(applied: int, offset: int) -> None:
    """Raise OutOfOrder unless ``offset`` is exactly the one after ``applied``."""
    if offset != applied + 1:
        raise OutOfOrder(offset=offset, expected=applied + 1)
