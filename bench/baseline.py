#!/usr/bin/env python3
"""The service's performance baseline, reproducible on any machine: `bench/baseline.py`.

It builds the release binaries (unless --no-build), runs each one on loopback as a fresh process, drives
it with the load generator (examples/loadgen/) and the scenarios in bench/scenarios/, and prints one
markdown table per section (docs/performance.md is written from this output):

main           Every scenario against the service on SQLite and on PostgreSQL: calls/s, p50 and p99
               latency, the server's CPU per call (on PostgreSQL also the database's), idle and peak RSS.
bare           Plain tonic answering GetOrder from memory (examples/bare-server.rs): what the service
               spends per call above it is the cost of its layers and its store.
pgbench        The service's own GetOrder SELECT and CreateOrder INSERT, run by pgbench straight against
               PostgreSQL: what the database spends with no service in front.
observability  GetOrder on SQLite with JSON logs, metrics and OTLP trace export (to examples/otlp-sink.rs)
               all on, against all off, in alternating rounds.
growth         GetOrder, ListOrders and SearchOrders as the table grows, with each query's plan.
soak           (--soak only) the mixed workload for a long time, watching the server's RSS for leaks.

How it measures, and why:

* CPU time per call, not only throughput. The load generator shares the machine with the server (and
  with PostgreSQL), so calls/s is this machine's figure for the whole set-up. CPU time is read from /proc
  around each measured run: utime + stime of the server and, for PostgreSQL, of every `postgres` process
  plus what the postmaster reaped from exited children. It depends far less on who else runs, but anything
  else using the same PostgreSQL cluster during a run is counted too: run on a quiet cluster.
* Every measured run follows a warm-up run made by a separate loadgen invocation, so the CPU read around
  the measured run is spent on exactly the calls it reports.
* The seeded orders are deterministic (order i has id md5('order-i') as a UUID), so every run reads the
  same data; GetOrder asks for the middle order, SearchOrders for a part of its description that no other
  order holds.
* Smoke mode (--smoke, what CI runs) keeps every step short and checks function, never timing: every
  loadgen run must end with all calls OK and every table must be filled, else the exit status is 1.

PostgreSQL is expected at 127.0.0.1:5432, user postgres with trust authentication, with psql, createdb,
dropdb and pgbench on PATH. The script drops and re-creates its own database, order_perf, and drops it at
the end (unless --keep). When the cluster does not answer, its runs are skipped with a note.

Usage:

    bench/baseline.py                                # build, then the full baseline
    bench/baseline.py --smoke --no-build             # CI: each step for a few seconds
    bench/baseline.py --no-build --sections main,bare --backends sqlite --json /tmp/baseline.json
    bench/baseline.py --no-build --soak 10m          # everything, then a 10-minute soak
    bench/baseline.py --no-build --sections soak --soak 10m
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The binary's path from cargo (the package's name, CARGO_TARGET_DIR), so a renamed service needs no edit.
SERVICE_BIN = Path(
    subprocess.run(
        [REPO / "scripts" / "binary-path.sh", "release"], check=True, capture_output=True, text=True
    ).stdout.strip()
)
RELEASE = SERVICE_BIN.parent
LOADGEN_BIN = RELEASE / "examples" / "loadgen"
BARE_BIN = RELEASE / "examples" / "bare-server"
SINK_BIN = RELEASE / "examples" / "otlp-sink"
SCENARIO_DIR = REPO / "bench" / "scenarios"


def full_service_name(name: str) -> str:
    """`package.Service` for a service the scenarios name by its short name (loadgen resolves those in
    any package): the package is read from the proto file under proto/ that declares the service."""
    if "." in name:
        return name
    for proto in sorted((REPO / "proto").rglob("*.proto")):
        text = proto.read_text()
        package = re.search(r"^package\s+([\w.]+)\s*;", text, re.MULTILINE)
        if package and re.search(rf"^service\s+{re.escape(name)}\b", text, re.MULTILINE):
            return f"{package.group(1)}.{name}"
    sys.exit(f"baseline: no proto file under proto/ declares service {name}")


# The API's service as the scenarios call it (`Service/Method`, or `package.Service/Method`), in full:
# the readiness probe asks for it.
API_SERVICE = full_service_name(
    json.loads((SCENARIO_DIR / "get-order.json").read_text())["call"].split("/")[0]
)
BUILD_COMMAND = [
    "cargo",
    "build",
    "--release",
    "--locked",
    "--bin",
    SERVICE_BIN.name,
    *"--example loadgen --example bare-server --example otlp-sink".split(),
]

SECTIONS = ["main", "bare", "pgbench", "observability", "growth"]
BACKENDS = ["sqlite", "postgres"]
# Reads first: the creates add rows, and SearchOrders on SQLite reads every row.
MAIN_SCENARIOS = "get-order list-orders search-orders create-order create-order-retried mixed".split()
GROWTH_SCENARIOS = {
    "sqlite": ["get-order", "list-orders"],
    "postgres": ["get-order", "list-orders", "search-orders"],
}

PG_HOST, PG_PORT, PG_USER, PG_DB = "127.0.0.1", "5432", "postgres", "order_perf"
PG_URL = f"postgres://{PG_USER}@{PG_HOST}:{PG_PORT}/{PG_DB}"

# The queries of src/store/postgres.rs and src/store/sqlite.rs, for EXPLAIN and pgbench. They must match
# what the stores send: update them when `fn get`, `fn list` or `fn search` there change.
COLUMNS = "seq, id, items, description, price_cents, destination, status, create_time, update_time"
PG_GET_SQL = f"SELECT {COLUMNS} FROM orders WHERE id = $1"
PG_LIST_SQL = f"SELECT {COLUMNS} FROM orders WHERE seq > $1 ORDER BY seq LIMIT $2"
# PostgresStore::SEARCH_SQL, word for word; $1 is the LIKE pattern '%<query>%'.
PG_SEARCH_SQL = (
    f"SELECT {COLUMNS} FROM orders"
    " WHERE lower(description) LIKE lower($1)"
    " OR (order_items_folded(items) LIKE lower($1)"
    " AND EXISTS (SELECT 1 FROM unnest(items) AS item WHERE lower(item) LIKE lower($1)))"
    " ORDER BY seq"
)
SQLITE_GET_SQL = f"SELECT {COLUMNS} FROM orders WHERE id = ?1"
SQLITE_LIST_SQL = f"SELECT {COLUMNS} FROM orders WHERE seq > ?1 ORDER BY seq LIMIT ?2"
# ListOrders reads page_size + 1 rows; bench/scenarios/list-orders.json asks for 50.
LIST_LIMIT = 51

PGBENCH_SCRIPTS = {
    "select": f"SELECT {COLUMNS} FROM orders WHERE id = :id::uuid;\n",
    "insert": (
        "INSERT INTO orders (id, request_id, items, description, price_cents, destination, status,"
        " create_time, update_time) VALUES (gen_random_uuid(), gen_random_uuid()::text,"
        " ARRAY['widget','gadget'], 'a benchmark order', 1250, 'Oslo', 'PENDING', now(), now())"
        f" ON CONFLICT (request_id) DO NOTHING RETURNING {COLUMNS};\n"
    ),
}

# The targets docs/performance.md sets.
TARGET_BARE_RATIO = 2.0
TARGET_PG_SELECT_RATIO = 1.25
TARGET_PG_INSERT_RATIO = 0.4
TARGET_OBSERVABILITY_LOSS = 0.10

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT_S = 30.0
# Lets a server finish start-up work (pool connections, first health checks) before its RSS is read.
SETTLE_S = 1.0
SOAK_WARMUP_S = 30
SOAK_SAMPLE_S = 10

LOAD_HEADERS = ["calls/s", "p50 ms", "p99 ms", "server µs/call", "PG µs/call"]


class BenchError(Exception):
    """A step could not be done; the message says which and why."""


def log(message: str) -> None:
    """Progress goes to stderr, so that stdout holds only the report."""
    print(f"[baseline] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class Settings:
    smoke: bool
    build: bool
    backends: list[str]
    sections: list[str]
    duration: int
    concurrency: int
    connections: int
    warmup: int
    rows: int
    sizes: list[int]
    soak: int | None
    keep: bool
    json_path: Path | None
    db_connections: int | None


def parse_args(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(
        description="The order service's performance baseline, as markdown tables on stdout.",
        epilog="What is measured, and how: the docstring at the top of bench/baseline.py.",
    )
    add = parser.add_argument
    add("--smoke", action="store_true", help="each step briefly, checking function only (CI)")
    add("--no-build", action="store_true", help="use the binaries already in target/release")
    add("--backends", metavar="LIST", default="sqlite,postgres", help="default: sqlite,postgres")
    add(
        "--sections",
        metavar="LIST",
        default=",".join(SECTIONS),
        help=f"default: {','.join(SECTIONS)} (and soak, with --soak)",
    )
    add("--duration", metavar="SECS", type=int, help="length of each measured run (10; smoke 2)")
    add("--concurrency", metavar="N", type=int, default=64, help="calls in flight; pgbench clients (64)")
    add("--connections", metavar="N", type=int, default=8, help="HTTP/2 connections (8)")
    add("--warmup", metavar="CALLS", type=int, help="calls before each measured run (5000; smoke 200)")
    add("--rows", metavar="N", type=int, help="orders seeded, outside growth (10000; smoke 1000)")
    add(
        "--sizes",
        metavar="N,N,...",
        type=parse_sizes,
        help="growth's sizes (1000,100000,1000000; smoke 1000,10000)",
    )
    add("--soak", metavar="DURATION", type=parse_duration, help="soak for this long, e.g. 10m (off)")
    add("--keep", action="store_true", help="keep the database order_perf and the temporary directory")
    add("--json", metavar="PATH", type=Path, help="also write every number to this file")
    add("--db-connections", metavar="N", type=int, help="the service's database pool size (its default: 10)")
    args = parser.parse_args(argv)

    def smoke_or(smoke, full):
        return smoke if args.smoke else full

    sections = split_list(parser, args.sections, [*SECTIONS, "soak"], "--sections")
    if "soak" in sections and not args.soak:
        parser.error("the soak section needs --soak DURATION")
    sizes = args.sizes or smoke_or([1000, 10000], [1000, 100_000, 1_000_000])
    rows = args.rows or smoke_or(1000, 10000)
    if min(rows, *sizes) < 2:
        parser.error("--rows and --sizes need 2 orders or more (GetOrder reads the middle one)")
    if not 1 <= args.connections <= args.concurrency:
        parser.error("--connections must be between 1 and --concurrency")
    return Settings(
        smoke=args.smoke,
        build=not args.no_build,
        backends=split_list(parser, args.backends, BACKENDS, "--backends"),
        sections=[*sections, "soak"] if args.soak and "soak" not in sections else sections,
        duration=args.duration or smoke_or(2, 10),
        concurrency=args.concurrency,
        connections=args.connections,
        warmup=smoke_or(200, 5000) if args.warmup is None else args.warmup,
        rows=rows,
        sizes=sizes,
        soak=args.soak,
        keep=args.keep,
        json_path=args.json,
        db_connections=args.db_connections,
    )


def split_list(parser: argparse.ArgumentParser, text: str, known: list[str], flag: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items or any(item not in known for item in items):
        parser.error(f"{flag} takes a comma-separated subset of {','.join(known)}")
    return items


def parse_sizes(text: str) -> list[int]:
    try:
        return [int(size) for size in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of numbers like 1000,100000") from None


def parse_duration(text: str) -> int:
    """Seconds, from `600`, `600s`, `10m` or `1h`."""
    match = re.fullmatch(r"(\d+)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 600s, 10m or 1h")
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


# ------------------------------------------------------------------------------------------------------
# Readings from /proc


def stat_fields(pid: int) -> tuple[str, list[str]]:
    """The command name and fields 3 onwards of /proc/PID/stat. Field 2, `(comm)`, may itself hold
    spaces and parentheses, so the other fields start after the last `)`."""
    text = Path(f"/proc/{pid}/stat").read_text()
    close = text.rindex(")")
    return text[text.index("(") + 1 : close], text[close + 2 :].split()


def cpu_seconds(fields: list[str], reaped: bool = False) -> float:
    """utime + stime (fields 14 and 15) or, with `reaped`, cutime + cstime (16 and 17): the CPU time of
    children the process has waited for. The indices are 3 lower: `stat_fields` drops fields 1 and 2."""
    first = 13 if reaped else 11
    return (int(fields[first]) + int(fields[first + 1])) / CLOCK_TICKS


def process_cpu(pid: int) -> float:
    return cpu_seconds(stat_fields(pid)[1])


def postgres_cpu() -> float | None:
    """CPU seconds of the whole PostgreSQL cluster: every process named `postgres` (backends, the
    postmaster, background workers) plus what the postmaster reaped from exited children (the backends
    of closed connections). None when no PostgreSQL process is visible (it runs in another container).

    A backend that exits while /proc is scanned may be counted twice, live and reaped; callers read
    when no connection is opening or closing."""
    live: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError):
                name, fields = stat_fields(int(entry))
                if name == "postgres":
                    live[int(entry)] = fields
    if not live:
        return None
    total = sum(cpu_seconds(fields) for fields in live.values())
    # The postmaster is the postgres process whose parent is not one.
    for fields in live.values():
        if int(fields[1]) not in live:
            total += cpu_seconds(fields, reaped=True)
    return total


def memory_kb(pid: int, key: str) -> int:
    """A line of /proc/PID/status: VmRSS (resident now) or VmHWM (the peak so far), in kB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


# ------------------------------------------------------------------------------------------------------
# Child processes


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without what configures the service (APP_*, RUST_LOG, OTEL_*), so
    that the shell the script runs in cannot change what is measured."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("APP_", "OTEL_")) and key != "RUST_LOG"
    }
    return {**env, **extra}


def free_ports(count: int) -> list[int]:
    """Ports the kernel has just handed out on loopback; all are held until all are chosen, so they
    differ."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


def run_command(
    argv: list, env: dict[str, str], timeout: float = 120, **kwargs
) -> subprocess.CompletedProcess:
    """Runs a command to its end, raising BenchError (with its output) when it fails."""
    name = Path(argv[0]).name
    try:
        done = subprocess.run(
            [str(arg) for arg in argv],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **kwargs,
        )
    except subprocess.TimeoutExpired as err:
        raise BenchError(f"{name} took longer than {timeout:.0f} s") from err
    if done.returncode != 0:
        output = (done.stderr.strip() or done.stdout.strip())[-2000:]
        raise BenchError(f"{name} exited with status {done.returncode}:\n{output}")
    return done


class Child:
    """A child that runs until stopped (server, sink), with its output in a log file in `cwd`."""

    def __init__(self, name: str, argv: list, env: dict[str, str], cwd: Path, stop_signal: int):
        self.name = name
        self.stop_signal = stop_signal
        self.log_path = cwd / f"{name}.log"
        # Append mode: the file can be emptied under the child (trim_log), whose writes then go on at the
        # new end instead of past a hole the size of the old content.
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [str(arg) for arg in argv],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 20.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"{self.name} exited with status {self.process.returncode}; its log ends:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return "(no log)"

    def trim_log(self) -> None:
        """Empties the log: the service writes a JSON line per call at info, and long runs must not fill
        the disk."""
        with contextlib.suppress(OSError):
            os.truncate(self.log_path, 0)


def wait_for_port(child: Child, addr: str) -> None:
    host, port = addr.rsplit(":", 1)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        child.check_alive()
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=0.5):
            return
        time.sleep(0.1)
    raise BenchError(f"{child.name} did not accept connections on {addr} in {READY_TIMEOUT_S:.0f} s")


# ------------------------------------------------------------------------------------------------------
# The data


def order_md5(i: int) -> str:
    return hashlib.md5(f"order-{i}".encode()).hexdigest()


def order_uuid(i: int) -> str:
    return str(uuid.UUID(order_md5(i)))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """`rows` seeded orders: order i has id md5('order-i') and description 'benchmark order <md5>'."""

    rows: int

    @property
    def order_id(self) -> str:
        """The middle order, for GetOrder."""
        return order_uuid(self.rows // 2)

    @property
    def search_query(self) -> str:
        """A part of the middle order's description that no other order holds, for SearchOrders."""
        return order_md5(self.rows // 2)[:12]

    def loadgen_env(self) -> dict[str, str]:
        return clean_env(ORDER_ID=self.order_id, SEARCH_QUERY=self.search_query)


PG_SEED_SQL = """
TRUNCATE orders RESTART IDENTITY;
INSERT INTO orders (id, items, description, price_cents, destination, status, create_time, update_time)
SELECT md5('order-' || i)::uuid, ARRAY['widget','gadget'], 'benchmark order ' || md5('order-' || i),
       1250, 'Oslo', 'PENDING', now(), now()
FROM generate_series(1, {rows}) AS i;
-- VACUUM as well as ANALYZE: it also empties the pending lists of the GIN (pg_trgm) indexes, which
-- autovacuum keeps short in production; left long, every search would read them through.
VACUUM ANALYZE orders;
"""

SQLITE_INSERT = (
    "INSERT INTO orders (id, items, description, price_cents, destination, status, create_time,"
    " update_time, items_folded, description_folded) VALUES (?, ?, ?, 1250, 'Oslo', 'PENDING', ?, ?, ?, ?)"
)
SQLITE_TIME = "2026-11-24T00:00:00.000000+00:00"


def seed_sqlite(db_path: Path, rows: int) -> None:
    """Replaces the orders by `rows` seeded ones in one transaction, as the service writes them: items
    as a JSON array, plus the lower-cased copies that SearchOrders reads."""
    items = json.dumps(["widget", "gadget"], separators=(",", ":"))

    def orders() -> Iterator[tuple]:
        for i in range(1, rows + 1):
            description = f"benchmark order {order_md5(i)}"
            yield order_uuid(i), items, description, SQLITE_TIME, SQLITE_TIME, items, description.lower()

    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as conn:
        with conn:
            conn.execute("DELETE FROM orders")
            # seq starts from 1 again, as after TRUNCATE ... RESTART IDENTITY on PostgreSQL.
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'orders'")
            conn.executemany(SQLITE_INSERT, orders())
        conn.execute("ANALYZE")
        # Copies the seeded pages from the WAL into the database, so reads do not start behind a long log.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class Postgres:
    """The PostgreSQL cluster at PG_HOST:PG_PORT, through its command-line clients."""

    def __init__(self) -> None:
        self.version: str | None = None
        self.env = clean_env(PGCONNECT_TIMEOUT="5")
        self.connect_args = ["-h", PG_HOST, "-p", PG_PORT, "-U", PG_USER]

    def probe(self) -> str | None:
        """None when the cluster answers, else why not."""
        if not shutil.which("psql"):
            return "psql is not on PATH"
        try:
            self.version = self.run("SHOW server_version", db="postgres").strip()
        except BenchError as err:
            return " ".join(str(err).split())
        return None

    def run(self, sql: str, db: str = PG_DB) -> str:
        """Runs `sql` as a script (statement by statement) and returns the rows, unaligned."""
        argv = ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", *self.connect_args, "-d", db, "-f", "-"]
        return run_command(argv, self.env, timeout=3600, input=sql).stdout

    def recreate(self) -> None:
        """A new, empty order_perf; `--force` ends connections a crashed run may have left."""
        self.drop()
        run_command(["createdb", *self.connect_args, PG_DB], self.env)

    def drop(self) -> None:
        run_command(["dropdb", "--if-exists", "--force", *self.connect_args, PG_DB], self.env)

    def seed(self, rows: int) -> None:
        self.run(PG_SEED_SQL.format(rows=rows))


# ------------------------------------------------------------------------------------------------------
# The run's state, and the service


class Bench:
    """What the sections share: the settings, the children to stop, findings and results."""

    def __init__(self, settings: Settings, root: Path):
        self.settings = settings
        self.root = root
        self.children: list[Child] = []
        self.pg = Postgres()
        self.pg_available = False
        self.problems: list[str] = []  # calls that were not OK
        self.errors: list[str] = []  # sections that could not finish
        self.notes: list[str] = []
        self.results: dict[str, object] = {}  # by section, ready for JSON

    def backends(self) -> list[str]:
        return [b for b in self.settings.backends if b != "postgres" or self.pg_available]

    def workdir(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.root))

    def start(
        self, name: str, argv: list, env: dict[str, str], cwd: Path, stop_signal=signal.SIGTERM
    ) -> Child:
        child = Child(name, argv, env, cwd, stop_signal)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            child.stop()
        self.children.clear()

    def check(self, label: str, report: dict) -> None:
        """Records a loadgen run that made no call, or in which any call did not end OK."""
        count, ok = report["count"], report["ok"]
        if count == 0 or ok != count:
            errors = "; ".join(f"{n}x {message}" for message, n in list(report["errors"].items())[:3])
            self.problems.append(f"{label}: {count - ok} of {count} calls not OK ({errors or 'no calls'})")


@dataclasses.dataclass
class Service:
    child: Child
    addr: str
    backend: str
    workdir: Path

    @property
    def sqlite_path(self) -> Path:
        return self.workdir / "orders.db"


def service_env(
    settings: Settings, addr: str, metrics_addr: str, db_url: str, **overrides: str
) -> dict[str, str]:
    env = clean_env(
        APP_SERVER__GRPC_ADDR=addr,
        APP_SERVER__METRICS_ADDR=metrics_addr,  # "" turns the metrics listener off
        APP_DATABASE__URL=db_url,
        APP_TELEMETRY__LOG_FORMAT="json",
        APP_TELEMETRY__LOG_LEVEL="info",
        APP_TELEMETRY__OTLP_ENDPOINT="",
        # No pause for load balancers to notice the shutdown: servers stop at once.
        APP_SHUTDOWN__DRAIN_DELAY="0s",
    )
    if settings.db_connections:
        env["APP_DATABASE__MAX_CONNECTIONS"] = str(settings.db_connections)
    return {**env, **overrides}


def start_service(bench: Bench, name: str, backend: str, metrics: bool = True, **overrides: str) -> Service:
    """A fresh server process in a fresh working directory, once its API is SERVING (which it is after
    its migrations ran)."""
    workdir = bench.workdir(name)
    grpc_port, metrics_port = free_ports(2)
    addr = f"127.0.0.1:{grpc_port}"
    db_url = PG_URL if backend == "postgres" else f"sqlite://{workdir / 'orders.db'}"
    metrics_addr = f"127.0.0.1:{metrics_port}" if metrics else ""
    env = service_env(bench.settings, addr, metrics_addr, db_url, **overrides)
    child = bench.start(name, [SERVICE_BIN], env, workdir)
    wait_until_serving(child, addr, env, workdir)
    return Service(child, addr, backend, workdir)


def wait_until_serving(child: Child, addr: str, env: dict[str, str], workdir: Path) -> None:
    probe = [SERVICE_BIN, "healthcheck", "--addr", addr, "--service", API_SERVICE]
    probe += ["--timeout", "1s"]
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        child.check_alive()
        with contextlib.suppress(BenchError):
            run_command(probe, env, timeout=10, cwd=workdir)
            return
        time.sleep(0.2)
    raise BenchError(
        f"{child.name} was not SERVING after {READY_TIMEOUT_S:.0f} s; its log ends:\n{child.log_tail()}"
    )


@contextlib.contextmanager
def running_service(bench: Bench, name: str, backend: str) -> Iterator[Service]:
    """A server on a fresh database (a new order_perf, for PostgreSQL), stopped on the way out."""
    if backend == "postgres":
        bench.pg.recreate()
    service = start_service(bench, name, backend)
    try:
        yield service
    finally:
        bench.stop(service.child)


def seed(bench: Bench, service: Service, rows: int) -> None:
    started = time.monotonic()
    if service.backend == "postgres":
        bench.pg.seed(rows)
    else:
        seed_sqlite(service.sqlite_path, rows)
    log(f"seeded {rows:,} orders into {service.backend} in {time.monotonic() - started:.1f} s")


# ------------------------------------------------------------------------------------------------------
# Load


@dataclasses.dataclass
class Load:
    """One measured loadgen run, and the CPU the server (and PostgreSQL) spent during it."""

    count: int
    ok: int
    seconds: float
    p50_us: float
    p99_us: float
    server_cpu_s: float | None = None
    pg_cpu_s: float | None = None

    @classmethod
    def from_report(cls, report: dict, server_cpu_s=None, pg_cpu_s=None) -> Load:
        latency = report["latency_us"]
        return cls(
            count=report["count"],
            ok=report["ok"],
            seconds=report["duration_s"],
            p50_us=latency["p50"],
            p99_us=latency["p99"],
            server_cpu_s=server_cpu_s,
            pg_cpu_s=pg_cpu_s,
        )

    @property
    def rps(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0

    @property
    def not_ok(self) -> int:
        return self.count - self.ok

    @property
    def server_us(self) -> float | None:
        return per_call_us(self.server_cpu_s, self.count)

    @property
    def pg_us(self) -> float | None:
        return per_call_us(self.pg_cpu_s, self.count)

    def as_json(self) -> dict:
        return {
            **dataclasses.asdict(self),
            "rps": self.rps,
            "server_us_per_call": self.server_us,
            "pg_us_per_call": self.pg_us,
        }


def per_call_us(cpu_s: float | None, count: int) -> float | None:
    return None if cpu_s is None or count == 0 else cpu_s * 1e6 / count


def difference(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def loadgen_argv(
    addr: str, scenario: str, settings: Settings, seconds: int, total: int | None = None
) -> list:
    """A loadgen run of `seconds`, or of `total` calls if those end first. Its own warm-up is off: the
    callers warm up with a run of its own (see `measure`)."""
    scenario_file = SCENARIO_DIR / f"{scenario}.json"
    argv = [LOADGEN_BIN, "--config", scenario_file, "--format", "json", "--progress", "never"]
    argv += ["-c", settings.concurrency, "--connections", settings.connections, "--warmup", 0]
    argv += ["-z", f"{seconds}s", *(["-n", total] if total is not None else [])]
    return [*argv, addr]


def with_run_id(env: dict[str, str]) -> dict[str, str]:
    """A new RUN_ID for each loadgen run. create-order-retried's request ids are RUN_ID plus the request
    number halved, and each run numbers from 0: with one RUN_ID, a measured run would only retry its
    warm-up's requests instead of making pairs of its own."""
    return {**env, "RUN_ID": secrets.token_hex(8)}


def run_loadgen(
    addr: str, scenario: str, env: dict, settings: Settings, seconds: int, total: int | None = None
) -> dict:
    argv = loadgen_argv(addr, scenario, settings, seconds, total)
    # A call times out after 20 s (loadgen's default), so a run ends well within this.
    done = run_command(argv, with_run_id(env), timeout=seconds + 60)
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError as err:
        raise BenchError(f"loadgen printed no JSON report: {done.stdout[:500]!r}") from err


def measure(
    bench: Bench, label: str, addr: str, scenario: str, env: dict, server: Child, *, with_pg: bool = False
) -> Load:
    """A warm-up run, then the measured run with the server's (and PostgreSQL's) CPU read around it."""
    settings = bench.settings
    server.trim_log()
    if settings.warmup:
        # Bounded by the run's duration too: a slow scenario (SearchOrders on a large SQLite table) would
        # otherwise warm up for minutes.
        bench.check(
            f"{label} (warm-up)",
            run_loadgen(addr, scenario, env, settings, settings.duration, settings.warmup),
        )
    server.check_alive()
    server_before, pg_before = process_cpu(server.pid), postgres_cpu() if with_pg else None
    report = run_loadgen(addr, scenario, env, settings, settings.duration)
    server_after, pg_after = process_cpu(server.pid), postgres_cpu() if with_pg else None
    server.check_alive()
    bench.check(label, report)
    load = Load.from_report(report, server_after - server_before, difference(pg_before, pg_after))
    log(f"{label}: {load.rps:,.0f} calls/s, {fmt_us(load.server_us)} µs of server CPU per call")
    return load


def measure_service(bench: Bench, label: str, service: Service, scenario: str, data: Dataset) -> Load:
    """`measure` against the service, counting PostgreSQL's CPU too when it is the service's store."""
    env = data.loadgen_env()
    return measure(
        bench, label, service.addr, scenario, env, service.child, with_pg=service.backend == "postgres"
    )


# ------------------------------------------------------------------------------------------------------
# Sections


def section_main(bench: Bench) -> None:
    if not bench.backends():
        return
    rows = [row for backend in bench.backends() for row in main_backend(bench, backend)]
    print_heading("Scenarios")
    headers = ["scenario", "backend", *LOAD_HEADERS, "idle RSS MB", "peak RSS MB", "not-OK"]
    print(markdown_table(headers, [main_cells(row) for row in rows]))
    print(
        f"\n{bench.settings.rows:,} orders seeded; one server process per backend, running the scenarios in"
        " this order. Server and PG µs/call: CPU time of the server process, and of all PostgreSQL"
        " processes, per call. Peak RSS: the process's high-water mark at the end of the row's run."
    )
    bench.results["main"] = [{**row, "load": row["load"].as_json()} for row in rows]


def main_backend(bench: Bench, backend: str) -> list[dict]:
    data = Dataset(bench.settings.rows)
    rows = []
    with running_service(bench, f"main-{backend}", backend) as service:
        seed(bench, service, data.rows)
        time.sleep(SETTLE_S)
        pid = service.child.pid
        idle_kb = memory_kb(pid, "VmRSS")
        for scenario in MAIN_SCENARIOS:
            load = measure_service(bench, f"{backend} {scenario}", service, scenario, data)
            rows.append(
                {
                    "scenario": scenario,
                    "backend": backend,
                    "load": load,
                    "idle_rss_kb": idle_kb,
                    "peak_rss_kb": memory_kb(pid, "VmHWM"),
                }
            )
    return rows


def main_cells(row: dict) -> list:
    load = row["load"]
    return [
        row["scenario"],
        row["backend"],
        *load_cells(load),
        fmt_mb(row["idle_rss_kb"]),
        fmt_mb(row["peak_rss_kb"]),
        load.not_ok,
    ]


def section_bare(bench: Bench) -> None:
    addr = f"127.0.0.1:{free_ports(1)[0]}"
    # bare-server stops on Ctrl-C only.
    child = bench.start("bare-server", [BARE_BIN, addr], clean_env(), bench.workdir("bare"), signal.SIGINT)
    try:
        wait_for_port(child, addr)
        time.sleep(SETTLE_S)
        idle_kb = memory_kb(child.pid, "VmRSS")
        # The bare server answers any id.
        load = measure(bench, "bare get-order", addr, "get-order", Dataset(2).loadgen_env(), child)
        peak_kb = memory_kb(child.pid, "VmHWM")
    finally:
        bench.stop(child)
    row = {
        "scenario": "get-order",
        "backend": "bare tonic",
        "load": load,
        "idle_rss_kb": idle_kb,
        "peak_rss_kb": peak_kb,
    }
    print_heading("Bare tonic: GetOrder answered from memory")
    headers = ["scenario", "server", *LOAD_HEADERS, "idle RSS MB", "peak RSS MB", "not-OK"]
    print(markdown_table(headers, [main_cells(row)]))
    bench.results["bare"] = {**row, "load": load.as_json()}


def section_pgbench(bench: Bench) -> None:
    if not bench.pg_available:
        return
    data = Dataset(bench.settings.rows)
    bench.pg.recreate()
    migrate_postgres(bench)
    bench.pg.seed(data.rows)
    found = bench.pg.run(f"SELECT count(*) FROM orders WHERE id = '{data.order_id}'").strip()
    if found != "1":
        raise BenchError(f"order {data.order_id} should be in order_perf once, is there {found} times")
    workdir = bench.workdir("pgbench")
    results = {}
    for name, script in PGBENCH_SCRIPTS.items():
        path = workdir / f"{name}.sql"
        path.write_text(script)
        results[name] = run_pgbench(bench, path, data.order_id)
        result = results[name]
        log(f"pgbench {name}: {result['tps']:,.0f} tps, {fmt_us(result['pg_us_per_txn'])} µs of PG CPU each")
    print_heading("pgbench: the service's statements straight to PostgreSQL")
    print(
        markdown_table(
            ["statement", "clients", "tps", "latency ms", "PG µs/txn", "failed"],
            [pgbench_cells(name, r) for name, r in results.items()],
        )
    )
    print(
        "\n`pgbench -n -M prepared -j 2`, as many clients as the service's loadgen runs have calls in flight."
        " select: GetOrder's SELECT (`-D id=<the middle order>`); insert: CreateOrder's INSERT ... ON"
        " CONFLICT DO NOTHING RETURNING. PG µs/txn: CPU of all PostgreSQL processes per transaction."
    )
    bench.results["pgbench"] = results


def pgbench_cells(name: str, result: dict) -> list:
    return [
        name,
        result["clients"],
        f"{result['tps']:,.0f}",
        f"{result['latency_ms']:.2f}",
        fmt_us(result["pg_us_per_txn"]),
        result["failed"],
    ]


def migrate_postgres(bench: Bench) -> None:
    """The schema as the service makes it, without starting a server."""
    env = service_env(bench.settings, "127.0.0.1:0", "", PG_URL, APP_TELEMETRY__LOG_LEVEL="warn")
    run_command([SERVICE_BIN, "migrate"], env, cwd=bench.workdir("migrate"))


def run_pgbench(bench: Bench, script: Path, order_id: str) -> dict:
    clients = bench.settings.concurrency
    base = ["pgbench", *bench.pg.connect_args, "-n", "-M", "prepared", "-c", clients, "-j", min(2, clients)]
    argv = [*base, "-D", f"id={order_id}", "-f", script, PG_DB]
    duration, warmup = bench.settings.duration, bench.settings.warmup
    timeout = duration + 120
    if warmup:
        # -t counts transactions per client.
        run_command([*argv, "-t", max(1, warmup // clients)], bench.pg.env, timeout=timeout)
    before = postgres_cpu()
    output = run_command([*argv, "-T", duration], bench.pg.env, timeout=timeout).stdout
    # pgbench has disconnected: let its backends exit and be reaped before reading (see postgres_cpu).
    time.sleep(0.5)
    after = postgres_cpu()
    transactions = int(find(r"number of transactions actually processed: (\d+)", output))
    failed = int(find(r"number of failed transactions: (\d+)", output, "0"))
    if transactions == 0 or failed:
        bench.problems.append(f"pgbench {script.stem}: {transactions} transactions, {failed} failed")
    return {
        "clients": clients,
        "transactions": transactions,
        "failed": failed,
        "tps": float(find(r"tps = ([\d.]+) \(without initial connection time\)", output)),
        "latency_ms": float(find(r"latency average = ([\d.]+) ms", output)),
        # Includes starting and ending the clients' backends: milliseconds, against seconds of work.
        "pg_us_per_txn": per_call_us(difference(before, after), transactions),
    }


def find(pattern: str, text: str, default: str | None = None) -> str:
    match = re.search(pattern, text)
    if match:
        return match[1]
    if default is None:
        raise BenchError(f"no {pattern!r} in:\n{text[-1000:]}")
    return default


def section_observability(bench: Bench) -> None:
    data = Dataset(bench.settings.rows)
    sink_addr = f"127.0.0.1:{free_ports(1)[0]}"
    sink = bench.start("otlp-sink", [SINK_BIN, sink_addr], clean_env(), bench.workdir("otlp-sink"))
    try:
        wait_for_port(sink, sink_addr)
        services = start_observability_pair(bench, sink_addr)
        try:
            for service in services.values():
                seed(bench, service, data.rows)
            # Alternating, so that a drift of the machine (other work, thermal) hits both alike.
            rounds = ["off", "on"] if bench.settings.smoke else ["off", "on", "off", "on"]
            loads = []
            for number, config in enumerate(rounds, 1):
                service = services[config]
                label = f"observability {config}, round {number}"
                load = measure_service(bench, label, service, "get-order", data)
                loads.append((config, load))
        finally:
            # Stopping the server flushes its last spans, so it stops before the sink.
            for service in services.values():
                bench.stop(service.child)
    finally:
        bench.stop(sink)
    spans = int(find(r"otlp-sink: (\d+) spans received", sink.log_tail(), "0"))
    if spans == 0:
        bench.problems.append("observability: otlp-sink received no spans from the server with tracing on")
    print_observability(bench, loads, spans)


def start_observability_pair(bench: Bench, sink_addr: str) -> dict[str, Service]:
    """Two SQLite servers: all off, and JSON logs at info, metrics and OTLP trace export all on."""
    services = {}
    try:
        services["off"] = start_service(
            bench, "observability-off", "sqlite", metrics=False, APP_TELEMETRY__LOG_LEVEL="warn"
        )
        services["on"] = start_service(
            bench,
            "observability-on",
            "sqlite",
            APP_TELEMETRY__OTLP_ENDPOINT=f"http://{sink_addr}",
            APP_TELEMETRY__SAMPLE_RATIO="0.1",
        )
    except BaseException:
        for service in services.values():
            bench.stop(service.child)
        raise
    return services


def print_observability(bench: Bench, loads: list[tuple[str, Load]], spans: int) -> None:
    medians = {
        config: {
            "rps": statistics.median(load.rps for c, load in loads if c == config),
            "server_us": statistics.median(load.server_us or 0.0 for c, load in loads if c == config),
        }
        for config in ("off", "on")
    }
    print_heading("Observability: GetOrder on SQLite, logs, metrics and traces on and off")
    headers = ["round", "observability", *LOAD_HEADERS[:4], "not-OK"]
    rows = [
        [number, config, *load_cells(load)[:4], load.not_ok] for number, (config, load) in enumerate(loads, 1)
    ]
    print(markdown_table(headers, rows))
    off, on = medians["off"], medians["on"]
    print(
        f"\nMedians: off {off['rps']:,.0f} calls/s and {off['server_us']:.1f} µs/call,"
        f" on {on['rps']:,.0f} calls/s and {on['server_us']:.1f} µs/call. On: JSON logs at info, metrics,"
        f" OTLP export to otlp-sink with sample ratio 0.1 ({spans:,} spans received)."
        " Off: logs at warn, no metrics listener, no OTLP."
    )
    bench.results["observability"] = {
        "rounds": [{"config": config, "load": load.as_json()} for config, load in loads],
        "medians": medians,
        "spans_received": spans,
    }


def section_growth(bench: Bench) -> None:
    if not bench.backends():
        return
    rows, plans = [], []
    for backend in bench.backends():
        with running_service(bench, f"growth-{backend}", backend) as service:
            for size in bench.settings.sizes:
                rows += growth_step(bench, service, Dataset(size))
                plans.append(
                    {"rows": size, "backend": backend, "plans": explain(bench, service, Dataset(size))}
                )
    print_heading("Growth")
    headers = ["orders", "backend", "scenario", *LOAD_HEADERS, "not-OK"]
    cells = [
        [f"{r['rows']:,}", r["backend"], r["scenario"], *load_cells(r["load"]), r["load"].not_ok]
        for r in rows
    ]
    print(markdown_table(headers, cells, text_columns=3))
    for entry in plans:
        print(f"\nQuery plans, {entry['backend']}, {entry['rows']:,} orders:\n")
        for query, plan in entry["plans"].items():
            print(f"{query}:\n```\n{plan}\n```")
    bench.results["growth"] = {"rows": [{**r, "load": r["load"].as_json()} for r in rows], "plans": plans}


def growth_step(bench: Bench, service: Service, data: Dataset) -> list[dict]:
    """Reseeds the running server's database with `data`, then measures the read scenarios."""
    seed(bench, service, data.rows)
    rows = []
    for scenario in GROWTH_SCENARIOS[service.backend]:
        label = f"growth {service.backend} {data.rows} {scenario}"
        load = measure_service(bench, label, service, scenario, data)
        rows.append({"rows": data.rows, "backend": service.backend, "scenario": scenario, "load": load})
    return rows


def explain(bench: Bench, service: Service, data: Dataset) -> dict[str, str]:
    if service.backend == "postgres":
        return {
            "GetOrder": pg_explain(bench, PG_GET_SQL, "uuid", f"'{data.order_id}'"),
            "ListOrders": pg_explain(bench, PG_LIST_SQL, "bigint, bigint", f"0, {LIST_LIMIT}"),
            "SearchOrders": pg_explain(bench, PG_SEARCH_SQL, "text", f"'%{data.search_query}%'"),
        }
    return {
        "GetOrder": sqlite_explain(service.sqlite_path, SQLITE_GET_SQL, (data.order_id,)),
        "ListOrders": sqlite_explain(service.sqlite_path, SQLITE_LIST_SQL, (0, LIST_LIMIT)),
    }


def pg_explain(bench: Bench, sql: str, types: str, args: str) -> str:
    """The plan of the statement as the service runs it: prepared. After five runs PostgreSQL may switch
    a prepared statement to a generic plan, made without the parameters' values; that plan is shown too
    when its shape differs."""

    def plan(mode: str) -> str:
        prepare = f"SET plan_cache_mode = {mode}; PREPARE q({types}) AS {sql};"
        return bench.pg.run(f"{prepare} EXPLAIN (COSTS OFF) EXECUTE q({args});").rstrip()

    custom, generic = plan("force_custom_plan"), plan("force_generic_plan")
    if plan_shape(custom) == plan_shape(generic):
        return custom
    return f"{custom}\n-- generic plan, which the prepared statement may switch to:\n{generic}"


def plan_shape(plan: str) -> list[str]:
    """A plan's nodes without their conditions, which hold $1 in a generic plan and the value in a
    custom one."""
    lines = plan.splitlines()
    return lines[:1] + [line.strip() for line in lines[1:] if "->" in line]


def sqlite_explain(db_path: Path, sql: str, params: tuple) -> str:
    """EXPLAIN QUERY PLAN through Python's SQLite, which may be another version than the one built into
    the service; plans this simple are the same in every recent version."""
    with contextlib.closing(sqlite3.connect(db_path, timeout=30)) as conn:
        steps = conn.execute(f"EXPLAIN QUERY PLAN {sql}", params).fetchall()
    depth = {0: -1}
    lines = []
    for step, parent, _, detail in steps:
        depth[step] = depth.get(parent, -1) + 1
        lines.append("  " * depth[step] + detail)
    return "\n".join(lines)


def section_soak(bench: Bench) -> None:
    if not bench.backends():
        return
    rows = [soak_backend(bench, backend) for backend in bench.backends()]
    print_heading(f"Soak: the mixed workload for {bench.settings.soak} s")
    headers = ["backend", "calls", "calls/s", "p99 ms", "not-OK"]
    headers += ["RSS after warm-up MB", "RSS at end MB", "max RSS MB", "change"]
    print(markdown_table(headers, [soak_cells(row) for row in rows], text_columns=1))
    print(
        f"\nVmRSS read every {SOAK_SAMPLE_S} s after a {SOAK_WARMUP_S} s warm-up;"
        f" {bench.settings.rows:,} orders seeded."
    )
    bench.results["soak"] = [{**row, "load": row["load"].as_json()} for row in rows]


def soak_backend(bench: Bench, backend: str) -> dict:
    settings = bench.settings
    data = Dataset(settings.rows)
    with running_service(bench, f"soak-{backend}", backend) as service:
        seed(bench, service, data.rows)
        bench.check(
            f"soak {backend} (warm-up)",
            run_loadgen(service.addr, "mixed", data.loadgen_env(), settings, SOAK_WARMUP_S),
        )
        samples = [memory_kb(service.child.pid, "VmRSS")]
        report = soak_run(service, data, settings, samples)
        bench.check(f"soak {backend}", report)
        samples.append(memory_kb(service.child.pid, "VmRSS"))
    return {"backend": backend, "load": Load.from_report(report), "samples_kb": samples}


def soak_run(service: Service, data: Dataset, settings: Settings, samples: list[int]) -> dict:
    """The soak's loadgen run, appending the server's RSS to `samples` every SOAK_SAMPLE_S."""
    argv = [str(arg) for arg in loadgen_argv(service.addr, "mixed", settings, settings.soak)]
    loadgen = subprocess.Popen(
        argv, env=with_run_id(data.loadgen_env()), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        while True:
            try:
                stdout, stderr = loadgen.communicate(timeout=SOAK_SAMPLE_S)
                break
            except subprocess.TimeoutExpired:
                service.child.check_alive()
                samples.append(memory_kb(service.child.pid, "VmRSS"))
                service.child.trim_log()
    finally:
        if loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
    if loadgen.returncode != 0:
        raise BenchError(f"loadgen exited with status {loadgen.returncode}:\n{stderr.strip()[-2000:]}")
    return json.loads(stdout)


def soak_cells(row: dict) -> list:
    load, samples = row["load"], row["samples_kb"]
    change = (samples[-1] - samples[0]) * 100 / samples[0]
    return [
        row["backend"],
        f"{load.count:,}",
        f"{load.rps:,.0f}",
        fmt_ms(load.p99_us),
        load.not_ok,
        fmt_mb(samples[0]),
        fmt_mb(samples[-1]),
        fmt_mb(max(samples)),
        f"{change:+.1f} %",
    ]


# ------------------------------------------------------------------------------------------------------
# The report


def fmt_ms(micros: float) -> str:
    return f"{micros / 1000:.2f}"


def fmt_us(micros: float | None) -> str:
    return "–" if micros is None else f"{micros:.1f}"


def fmt_mb(kb: int) -> str:
    return f"{kb / 1024:.1f}"


def load_cells(load: Load) -> list[str]:
    """The LOAD_HEADERS columns."""
    return [
        f"{load.rps:,.0f}",
        fmt_ms(load.p50_us),
        fmt_ms(load.p99_us),
        fmt_us(load.server_us),
        fmt_us(load.pg_us),
    ]


def markdown_table(headers: list[str], rows: list[list], text_columns: int = 2) -> str:
    """A markdown table that lines up in a terminal too; the columns after the first `text_columns` hold
    numbers, and are right-aligned."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [max([len(header), *(len(row[i]) for row in cells)]) for i, header in enumerate(headers)]

    def line(values: list[str]) -> str:
        padded = [
            value.ljust(w) if i < text_columns else value.rjust(w)
            for i, (value, w) in enumerate(zip(values, widths, strict=True))
        ]
        return f"| {' | '.join(padded)} |"

    rule = "|".join("-" * (w + 2) if i < text_columns else "-" * (w + 1) + ":" for i, w in enumerate(widths))
    return "\n".join([line(headers), f"|{rule}|", *(line(row) for row in cells)])


def print_heading(title: str) -> None:
    print(f"\n### {title}\n")


def ratios(bench: Bench) -> list[dict]:
    """The ratios the targets are set for, from whichever sections ran, each with its report line."""
    main = {(row["backend"], row["scenario"]): row["load"] for row in bench.results.get("main", [])}
    pgbench = bench.results.get("pgbench", {})
    found = []

    def add(name: str, values: dict[str, float], met: bool, line: str) -> None:
        found.append({"name": name, "values": values, "met": met, "line": line})

    bare = bench.results.get("bare")
    bare_us = bare and bare["load"]["server_us_per_call"]
    values = {
        b: main[(b, "get-order")]["server_us_per_call"] / bare_us
        for b in BACKENDS
        if bare_us and (b, "get-order") in main
    }
    if values:
        text = ", ".join(f"{backend} {value:.1f}x" for backend, value in values.items())
        met = all(value <= TARGET_BARE_RATIO for value in values.values())
        add(
            "get_order_server_cpu_vs_bare",
            values,
            met,
            f"GetOrder server CPU / bare tonic: {text} (target ≤ {TARGET_BARE_RATIO:g}x)",
        )

    get_order, select = main.get(("postgres", "get-order")), pgbench.get("select")
    if get_order and get_order["pg_us_per_call"] and select and select["pg_us_per_txn"]:
        value = get_order["pg_us_per_call"] / select["pg_us_per_txn"]
        line = (
            f"PG CPU per GetOrder / per pgbench SELECT: {value:.2f}x (target ≤ {TARGET_PG_SELECT_RATIO:g}x)"
        )
        add("pg_cpu_get_order_vs_pgbench_select", {"postgres": value}, value <= TARGET_PG_SELECT_RATIO, line)

    create_order, insert = main.get(("postgres", "create-order")), pgbench.get("insert")
    if create_order and insert and insert["tps"]:
        value = create_order["rps"] / insert["tps"]
        line = (
            f"CreateOrder on PostgreSQL calls/s / pgbench INSERT tps: {value:.2f}x"
            f" (target ≥ {TARGET_PG_INSERT_RATIO:g}x)"
        )
        add("create_order_pg_vs_pgbench_insert", {"postgres": value}, value >= TARGET_PG_INSERT_RATIO, line)

    observability = bench.results.get("observability")
    if observability and all(observability["medians"]["off"].values()):
        on, off = observability["medians"]["on"], observability["medians"]["off"]
        loss = 1 - on["rps"] / off["rps"]
        cpu = on["server_us"] / off["server_us"]
        line = (
            f"Observability on / off: {loss:.1%} fewer calls/s (target ≤ {TARGET_OBSERVABILITY_LOSS:.0%}),"
            f" server CPU per call {cpu:.2f}x"
        )
        add(
            "observability_throughput_loss",
            {"sqlite": loss, "cpu_ratio": cpu},
            loss <= TARGET_OBSERVABILITY_LOSS,
            line,
        )
    return found


def print_ratios(found: list[dict]) -> None:
    if found:
        print_heading("Ratios")
        for ratio in found:
            print(f"- {ratio['line']}{'' if ratio['met'] else ' — misses the target'}")


def machine_line(bench: Bench) -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError, TypeError):  # no file, or no "model name" line (some ARM kernels)
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)[1]
    postgres = f"PostgreSQL {bench.pg.version}" if bench.pg.version else "no PostgreSQL"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpus = len(os.sched_getaffinity(0))
    kernel = f"Linux {platform.release()}"
    return f"Machine: {cpus} CPUs (nproc), {model}, {kernel}, {postgres}; {now}, {git_revision()}."


def git_revision() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", REPO, *args], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        head, changes = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown"
    return f"commit {head}{' with local changes' if changes else ''}"


# ------------------------------------------------------------------------------------------------------
# Driver


SECTION_FUNCTIONS = {
    "main": section_main,
    "bare": section_bare,
    "pgbench": section_pgbench,
    "observability": section_observability,
    "growth": section_growth,
    "soak": section_soak,
}


def build(settings: Settings) -> None:
    if settings.build:
        log(f"building: {' '.join(BUILD_COMMAND)}")
        if subprocess.run(BUILD_COMMAND, cwd=REPO, check=False).returncode != 0:
            raise SystemExit("the build failed")
    missing = [str(path) for path in (SERVICE_BIN, LOADGEN_BIN, BARE_BIN, SINK_BIN) if not path.exists()]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}; build them: {' '.join(BUILD_COMMAND)}")


def check_postgres(bench: Bench) -> None:
    if "postgres" not in bench.settings.backends:
        return
    problem = bench.pg.probe()
    if problem:
        bench.notes.append(
            f"PostgreSQL at {PG_HOST}:{PG_PORT} does not answer, its runs were skipped: {problem}"
        )
        log(bench.notes[-1])
        return
    bench.pg_available = True
    if postgres_cpu() is None:
        bench.notes.append("no PostgreSQL process is visible in /proc here, so there are no PG CPU figures")


def run_sections(bench: Bench) -> None:
    for name in bench.settings.sections:
        started = time.monotonic()
        log(f"section {name}")
        try:
            SECTION_FUNCTIONS[name](bench)
        except (BenchError, OSError) as err:
            bench.errors.append(f"section {name} failed: {err}")
            log(bench.errors[-1])
            bench.stop_all()
        log(f"section {name} took {time.monotonic() - started:.1f} s")
        if bench.settings.smoke and not section_filled(bench, name):
            bench.problems.append(f"section {name}: the table is empty")


def section_filled(bench: Bench, name: str) -> bool:
    """Whether the section produced numbers, or had nothing to run on (no PostgreSQL)."""
    needs_postgres = name == "pgbench" or (
        name in ("main", "growth", "soak") and bench.settings.backends == ["postgres"]
    )
    return bool(bench.results.get(name)) or (needs_postgres and not bench.pg_available)


def print_findings(bench: Bench) -> None:
    if bench.notes:
        print_heading("Notes")
        print("\n".join(f"- {note}" for note in bench.notes))
    if bench.errors or bench.problems:
        print_heading("Problems")
        print("\n".join(f"- {problem}" for problem in bench.errors + bench.problems))


def write_json(bench: Bench, machine: str) -> None:
    settings = {
        key: str(value) if isinstance(value, Path) else value
        for key, value in dataclasses.asdict(bench.settings).items()
    }
    document = {
        "machine": machine,
        "postgres_version": bench.pg.version,
        "settings": settings,
        "results": bench.results,
        "notes": bench.notes,
        "problems": bench.problems,
        "errors": bench.errors,
    }
    bench.settings.json_path.write_text(json.dumps(document, indent=2) + "\n")
    log(f"wrote {bench.settings.json_path}")


def main(argv: list[str]) -> int:
    settings = parse_args(argv)
    build(settings)
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C does, through the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(settings, Path(tempfile.mkdtemp(prefix="order-baseline-")))
    started = time.monotonic()
    try:
        check_postgres(bench)
        machine = machine_line(bench)
        print(f"## Performance baseline{' (smoke run)' if settings.smoke else ''}\n\n{machine}\n")
        print(
            f"Load: {settings.concurrency} calls in flight on {settings.connections} connections;"
            f" {settings.warmup:,} warm-up calls, then {settings.duration} s measured, per run."
        )
        run_sections(bench)
        bench.results["ratios"] = ratios(bench)
        print_ratios(bench.results["ratios"])
        print_findings(bench)
        if settings.json_path:
            write_json(bench, machine)
    finally:
        bench.stop_all()
        if bench.pg_available and not settings.keep:
            with contextlib.suppress(BenchError):
                bench.pg.drop()
        if settings.keep:
            log(f"kept {bench.root}" + (f" and the database {PG_DB}" if bench.pg_available else ""))
        else:
            shutil.rmtree(bench.root, ignore_errors=True)
        log(f"total {time.monotonic() - started:.1f} s")
    return 1 if bench.errors or (settings.smoke and bench.problems) else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
