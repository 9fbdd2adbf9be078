"""A real single-node Apache Kafka broker for development and tests (KRaft: one process is
both broker and controller, on loopback, with a real log directory).

    python3 -m datatether.tools.kafka_broker start|stop|status [--dir DIR] [--port N]

or from Python (tests)::

    with kafka_broker.start(tmp_dir) as broker:   # a Broker; leaving the block stops it
        KafkaLog(broker.bootstrap)
        broker.kill()       # SIGKILL, as a crash
        broker.restart()    # same dir, same port: clients reconnect

How it gets there:
1. **Jars**: ``mvn dependency:copy-dependencies`` on tools/kafka/pom.xml gathers Kafka and its
   run-time dependencies into ``$XDG_CACHE_HOME/datatether/kafka-<version>/libs`` (default
   ``~/.cache``). The folder is complete or absent (filled beside it, then renamed), so a
   second run never needs the network.
2. **Storage**: the first start of a DIR writes its config and formats ``DIR/data`` with
   ``kafka.tools.StorageTool`` and a generated cluster id.
3. **Launch**: ``java -cp libs/* kafka.Kafka DIR/server.properties`` in its own session and
   process group, stdout and stderr into ``DIR/broker.log``, its pid in ``DIR/broker.pid``.
4. **Ready**: the broker counts as up once its metadata lists itself (an admin client
   answer); start gives up after ``timeout_s`` and names the log file.

Layout of DIR::

    server.properties   broker and controller config (rewritten at each start)
    log4j2.properties   broker logging: everything to stdout, i.e. broker.log
    data/               Kafka's log directory (formatted once)
    broker.log, broker.pid

Listeners: ``PLAINTEXT`` on ``port`` (``Broker.bootstrap``) and ``SASL_PLAINTEXT`` with the
PLAIN mechanism on ``sasl_port`` (``Broker.sasl_bootstrap``), for one user, ``SASL_USER`` with
``SASL_PASSWORD``: a test can then show that clients authenticate with properties from
``config.toml``. Both are on loopback only; the password protects nothing real.

Invariant: a DIR is restartable. Storage is formatted once and the ports are kept from the
previous start unless a new broker port is asked for, so clients that knew the old address
reconnect after a restart (the broker-kill tests rely on it).
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..engine import logs
from ..engine.errors import EXIT_ERROR, BackendUnavailable, DtError

log = logs.get(__name__)

POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
HOST = "127.0.0.1"
JAVA_OPTS = ["-Xms128m", "-Xmx512m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
             "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true"]
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
WHAT = "Kafka broker"
SASL_USER = "dt"
SASL_PASSWORD = "dt-test-only"

# Single node, tuned for tests: every internal topic has one replica, consumer groups start
# without delay, nothing is created implicitly (a typo must not create a topic), and group
# offsets outlive a long pause of a consumer (a year instead of Kafka's 7 days). A short broker
# session lets a SIGKILLed broker re-register within seconds of its restart instead of ~10 s.
SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@{host}:{controller_port}
listeners=PLAINTEXT://{host}:{port},SASL_PLAINTEXT://{host}:{sasl_port},CONTROLLER://{host}:{controller_port}
advertised.listeners=PLAINTEXT://{host}:{port},SASL_PLAINTEXT://{host}:{sasl_port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT
sasl.enabled.mechanisms=PLAIN
listener.name.sasl_plaintext.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule \
  required username="{user}" password="{password}" user_{user}="{password}";
log.dirs={data}
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
offsets.retention.minutes=525600
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
delete.topic.enable=true
num.network.threads=2
num.io.threads=2
log.retention.check.interval.ms=10000
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=3000
"""

LOG4J2_PROPERTIES = """\
status = warn
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.state.name = state.change.logger
logger.state.level = WARN
"""


def kafka_version() -> str:
    """The Kafka version pinned in tools/kafka/pom.xml (its ``kafka.version`` property)."""
    found = re.search(r"<kafka\.version>([^<]+)</kafka\.version>", POM.read_text())
    if not found:
        raise BackendUnavailable(backend=WHAT, detail=f"{POM} names no kafka.version")
    return found.group(1).strip()


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "datatether" / f"kafka-{kafka_version()}"


def jars(cache: Path | None = None) -> Path:
    """The folder holding every jar the broker needs; assembled with Maven on first use."""
    libs = (cache or cache_dir()) / "libs"
    if libs.is_dir():
        return libs
    if shutil.which("mvn") is None or shutil.which("java") is None:
        raise BackendUnavailable(backend=WHAT, detail="java and mvn are needed to assemble it; "
                                 "run tools/install.sh --test (Debian packages openjdk-17-jre-headless, maven)")
    partial = libs.with_name(f"libs.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    log.info("assembling broker jars", msgid="DT-K001", into=str(libs), version=kafka_version())
    done = subprocess.run(["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
                           f"-DoutputDirectory={partial}"], capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise BackendUnavailable(backend=WHAT, detail="Maven could not assemble the jars: "
                                 + _tail(done.stdout + done.stderr))
    try:
        partial.rename(libs)
    except OSError:  # another process finished first: its copy is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    return libs


def new_cluster_id() -> str:
    """A Kafka cluster id: 16 random bytes, URL-safe base64 without padding, never led by
    '-' (Kafka's own rule, so the id cannot be mistaken for a command-line option)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class Broker:
    """A broker process started from (or found in) ``dir``. Stops on leaving a ``with``."""

    dir: Path
    port: int
    pid: int
    process: subprocess.Popen | None = None  # set when this process started it
    tied: bool = False  # it dies with the thread that started it (start(tied=True))

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def sasl_bootstrap(self) -> str:
        """The SASL_PLAINTEXT listener (PLAIN, ``SASL_USER``/``SASL_PASSWORD``)."""
        return f"{HOST}:{_previous_ports(self.dir)[2]}"

    @property
    def log_file(self) -> Path:
        return self.dir / "broker.log"

    def running(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        return _is_our_broker(self.pid, self.dir)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Ask for a clean shutdown (SIGTERM); SIGKILL whatever still runs after ``timeout_s``."""
        self._signal(signal.SIGTERM)
        if not self._wait_gone(timeout_s):
            log.warning("broker ignored SIGTERM, killing it", msgid="DT-K002", pid=self.pid)
            self._signal(signal.SIGKILL)
            self._wait_gone(STOP_TIMEOUT_S)
        (self.dir / "broker.pid").unlink(missing_ok=True)
        log.info("broker stopped", msgid="DT-K003", pid=self.pid)

    def kill(self) -> None:
        """SIGKILL the broker at once (crash tests); ``start(dir)`` brings it back."""
        self._signal(signal.SIGKILL)
        self._wait_gone(STOP_TIMEOUT_S)
        (self.dir / "broker.pid").unlink(missing_ok=True)

    def restart(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop this broker if it runs, start it again on the same dir and port, and follow
        the new process (crash tests: ``kill()`` then ``restart()``)."""
        if self.running():
            self.stop()
        fresh = start(self.dir, self.port, timeout_s=timeout_s, tied=self.tied)
        self.pid, self.process = fresh.pid, fresh.process

    def _signal(self, sig: int) -> None:
        if not self.running():
            return
        try:
            os.killpg(self.pid, sig)  # the broker leads its own process group
        except ProcessLookupError:
            pass

    def _wait_gone(self, timeout_s: float) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while self.running():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start(dir: str | os.PathLike, port: int | None = None, *, timeout_s: float = START_TIMEOUT_S,
          cache: Path | None = None, tied: bool = False) -> Broker:
    """Start a broker on ``dir`` (created, configured and formatted on first use) and return
    once it answers. ``port=None`` keeps the previous start's port, or picks a free one.
    ``tied``: the kernel kills the broker when the thread that started it dies (a test
    run killed before its teardown must not leave a broker behind); the command line's
    ``start`` leaves it running on purpose."""
    dir = Path(dir).resolve()
    dir.mkdir(parents=True, exist_ok=True)
    if (running := attach(dir)) is not None:
        raise BackendUnavailable(backend=WHAT, detail=f"one already runs on {dir} (pid {running.pid}, "
                                 f"{running.bootstrap})")
    libs = jars(cache)
    port, controller_port = _write_config(dir, port)
    _format_once(dir, libs)
    broker = _launch(dir, libs, port, tied)
    _wait_ready(broker, timeout_s)
    log.info("broker ready", msgid="DT-K004", bootstrap=broker.bootstrap, pid=broker.pid, dir=str(dir))
    return broker


def attach(dir: str | os.PathLike) -> Broker | None:
    """The broker running on ``dir`` (from its pid file), or None."""
    dir = Path(dir).resolve()
    try:
        pid = int((dir / "broker.pid").read_text())
    except (OSError, ValueError):
        return None
    if not _is_our_broker(pid, dir):
        return None
    return Broker(dir=dir, port=_previous_ports(dir)[0], pid=pid)


def _is_our_broker(pid: int, dir: Path) -> bool:
    """True if ``pid`` is alive and is the broker of ``dir`` (a recycled pid is not)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"kafka.Kafka" in cmdline and os.fsencode(dir / "server.properties") in cmdline


def _previous_ports(dir: Path) -> tuple[int | None, int | None, int | None]:
    """(broker, controller, SASL) ports of the previous start's listeners."""
    try:
        text = (dir / "server.properties").read_text()
    except OSError:
        return None, None, None
    found = dict(re.findall(r"(?<![A-Z_])(PLAINTEXT|CONTROLLER|SASL_PLAINTEXT)://[^:,]+:(\d+)", text))
    return tuple(int(found[name]) if name in found else None
                 for name in ("PLAINTEXT", "CONTROLLER", "SASL_PLAINTEXT"))


def _write_config(dir: Path, port: int | None) -> tuple[int, int]:
    old_port, old_controller, old_sasl = _previous_ports(dir)
    port = port or old_port or free_port()
    controller_port = old_controller or free_port()
    (dir / "server.properties").write_text(SERVER_PROPERTIES.format(
        host=HOST, port=port, controller_port=controller_port, sasl_port=old_sasl or free_port(),
        user=SASL_USER, password=SASL_PASSWORD, data=dir / "data"))
    (dir / "log4j2.properties").write_text(LOG4J2_PROPERTIES)
    return port, controller_port


def _java(libs: Path, dir: Path, main: str, *args: str) -> list[str]:
    return ["java", *JAVA_OPTS, f"-Dlog4j2.configurationFile={dir / 'log4j2.properties'}",
            "-cp", str(libs / "*"), main, *args]


def _format_once(dir: Path, libs: Path) -> None:
    if (dir / "data" / "meta.properties").exists():
        return
    cluster_id = new_cluster_id()
    done = subprocess.run(_java(libs, dir, "kafka.tools.StorageTool", "format", "-t", cluster_id,
                                "-c", str(dir / "server.properties")), capture_output=True, text=True)
    if done.returncode != 0:
        raise BackendUnavailable(backend=WHAT, detail="formatting its storage failed: "
                                 + _tail(done.stdout + done.stderr))
    log.info("broker storage formatted", msgid="DT-K005", cluster_id=cluster_id, dir=str(dir / "data"))


def _launch(dir: Path, libs: Path, port: int, tied: bool) -> Broker:
    # setpriv (util-linux) sets the parent-death signal and execs java: no preexec_fn,
    # which is unsafe in a process with threads (the tests' daemons and appliers).
    tie = ["setpriv", "--pdeathsig", "KILL", "--"] if tied else []
    with open(dir / "broker.log", "ab") as out:
        process = subprocess.Popen([*tie, *_java(libs, dir, "kafka.Kafka", str(dir / "server.properties"))],
                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    (dir / "broker.pid").write_text(f"{process.pid}\n")
    return Broker(dir=dir, port=port, pid=process.pid, process=process, tied=tied)


def _wait_ready(broker: Broker, timeout_s: float) -> None:
    """Return once the broker's metadata lists a broker; stop it and raise if it never does."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not broker.running():
            (broker.dir / "broker.pid").unlink(missing_ok=True)
            raise BackendUnavailable(backend=WHAT, detail=f"it exited during start-up; see {broker.log_file}: "
                                     + _tail(broker.log_file.read_text(errors="replace")))
        if _answers(broker.bootstrap):
            return
        time.sleep(0.2)
    broker.stop()
    raise BackendUnavailable(backend=WHAT, detail=f"it did not answer on {broker.bootstrap} within "
                             f"{timeout_s:.0f} s; see {broker.log_file}")


def _answers(bootstrap: str) -> bool:
    host, port = bootstrap.rsplit(":", 1)
    try:  # a cheap socket probe first keeps the client library from logging refused connections
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient
    try:
        metadata = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0}).list_topics(timeout=2)
    except KafkaException:
        return False
    return bool(metadata.brokers)


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m datatether.tools.kafka_broker",
        description="A single-node Apache Kafka broker (KRaft) on loopback for development and tests.",
        epilog="status exits 0 when the broker runs and 1 when it does not; errors exit 2.")
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", default=str(cache_dir().with_name("kafka-broker")),
                        help="broker folder: config, data, log (default: %(default)s)")
    parser.add_argument("--port", type=int, default=None,
                        help="broker port (default: the previous start's, else a free one)")
    args = parser.parse_args(argv)
    logs.configure(level="info")
    try:
        if args.action == "start":
            print(start(args.dir, args.port).bootstrap)
            return 0
        broker = attach(args.dir)
        if args.action == "stop":
            if broker is not None:
                broker.stop()
            return 0
        print(f"running on {broker.bootstrap}, SASL/PLAIN on {broker.sasl_bootstrap} (pid {broker.pid})"
              if broker else "stopped")
        return 0 if broker else 1
    except DtError as exc:
        print(f"kafka_broker: {exc.message}", file=sys.stderr)
        return exc.exit_code if exc.exit_code else EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
