"""Shared fixtures. Services (Kafka, FUSE) are required when DT_REQUIRE_SERVICES=1
(as `make test` and CI set it): a missing one then fails the test instead of skipping it."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_SERVICES = os.environ.get("DT_REQUIRE_SERVICES") == "1"


def need(condition: bool, what: str, install_hint: str) -> None:
    """Skip (developer machine) or fail (CI) when a service the test needs is absent."""
    if condition:
        return
    message = f"{what} is not available; install it with: {install_hint}"
    if REQUIRE_SERVICES:
        pytest.fail(message + " (DT_REQUIRE_SERVICES=1: services are required)")
    pytest.skip(message)


@pytest.fixture
def fuse_available():
    need(os.path.exists("/dev/fuse") and shutil.which("fusermount3") is not None,
         "FUSE (/dev/fuse and fusermount3)", "tools/install.sh (Debian package fuse3)")


# The session's Kafka broker (tests/kafka_fixture.py), imported here so all modules share one.
from kafka_fixture import kafka_broker  # noqa: E402,F401
