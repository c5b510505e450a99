"""
The consumers' database: SQLite in C{STATE_DIR/openclaw.db} by default,
PostgreSQL when C{DATABASE_URL} names one, both through
L{twisted.enterprise.adbapi} (each query runs on the pool's threads, never
on the reactor's).  One schema for both, versioned in C{schema_version};
L{ConsumerStore.migrate} brings a database up to date at start-up.

SQLite runs in WAL mode (readers do not wait on the writer) with one
connection (C{cp_max=1}: SQLite has one writer anyway).  PostgreSQL goes
through psycopg 3, a DB-API 2.0 module (PEP 249); concurrent start-ups
serialise their migrations on an advisory lock.

A PostgreSQL that cannot be reached must not hold the gateway: each
connection attempt gives up after C{connect_timeout}, and a silent peer is
found by TCP keepalives and C{tcp_user_timeout} (L{POSTGRES_DEFAULTS},
unless C{DATABASE_URL} sets them).  The pool's threads are daemon threads, and
L{ConsumerStore.close} never waits on the reactor thread for one still
blocked in the database.  A database that holds a transaction without an
error (a lock another session holds, a server stopped outright) must not
make a consumer command's change after the command was answered: each is
bounded (L{COMMAND_SECONDS}, L{ConsumerStore._command}).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import shlex
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Generic, TypeVar, cast

import attrs
import orjson
import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from twisted.application.internet import backoffPolicy
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from openclaw.consumers.model import (
    NO_CONSUMER,
    Consumer,
    consumer_fields,
    creation_time,
    is_retired_name,
    period_key,
    retired_name,
)
from openclaw.deferreds import InFlight
from openclaw.files import NotARegularFile, displaced, neither_user_nor_root, open_regular_file, replace_atomically
from openclaw.reactors import IStoreReactor
from openclaw.threads import DaemonThread
from openclaw.timefmt import compact

#: Each migration: the statements that take the schema from the version
#: before to its own.  Only ever append.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE consumers (
            name TEXT PRIMARY KEY,
            budget_usd DOUBLE PRECISION,
            budget_period TEXT NOT NULL,
            rpm BIGINT,
            tpm BIGINT,
            models TEXT NOT NULL,
            expires_at DOUBLE PRECISION,
            created_at DOUBLE PRECISION NOT NULL)""",
        """CREATE TABLE consumer_keys (
            hash TEXT PRIMARY KEY,
            prefix TEXT NOT NULL,
            consumer TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL)""",
        "CREATE INDEX consumer_keys_consumer ON consumer_keys (consumer)",
        """CREATE TABLE usage_rows (
            ts DOUBLE PRECISION NOT NULL,
            day TEXT NOT NULL,
            consumer TEXT NOT NULL,
            key_prefix TEXT NOT NULL,
            provider TEXT NOT NULL,
            model TEXT NOT NULL,
            status INTEGER NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            reasoning_tokens BIGINT NOT NULL,
            cost_usd DOUBLE PRECISION,
            duration_ms DOUBLE PRECISION NOT NULL,
            limited INTEGER NOT NULL)""",
        "CREATE INDEX usage_rows_ts ON usage_rows (ts)",
        "CREATE INDEX usage_rows_consumer_ts ON usage_rows (consumer, ts)",
        """CREATE TABLE spend (
            consumer TEXT NOT NULL,
            period TEXT NOT NULL,
            usd DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (consumer, period))""",
    ),
    # The calls of GATEWAY_API_KEYS' keys are written summed, one row per
    # UTC minute, provider, model and status: how many calls a row counts.
    ("ALTER TABLE usage_rows ADD COLUMN requests INTEGER NOT NULL DEFAULT 1",),
    # Each row's key (UsageRow.row_id): a batch written again after its
    # commit's answer was lost is not written twice.
    (
        "ALTER TABLE usage_rows ADD COLUMN row_id TEXT",
        # Partial: the rows written before have none (an index of nothing
        # to build on a large table, which a build would lock).
        "CREATE UNIQUE INDEX usage_rows_row_id ON usage_rows (row_id) WHERE row_id IS NOT NULL",
    ),
)

GROUPS = ("consumer", "model", "day")

#: The libpq connection parameters the gateway sets when C{DATABASE_URL}
#: does not (U{https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS}):
#: give up a connection attempt after 10 s; TCP keepalives after 30 s idle,
#: every 10 s, 3 unanswered ending the connection; data unacknowledged for
#: 30 s (C{tcp_user_timeout}, milliseconds) ending it too.
#:
#: All are libpq's own, client-side: none is sent to the server in the
#: startup packet, so a connection pooler in front of PostgreSQL takes
#: them.  Server settings (C{options=-c ...}) are not defaulted: PgBouncer
#: refuses the C{options} startup parameter unless told to ignore it
#: (U{https://www.pgbouncer.org/config.html#ignore_startup_parameters}),
#: and a session C{SET} would leak to other clients of a transaction
#: pool.  A statement timeout belongs on the role or the database
#: (C{ALTER ROLE ... SET statement_timeout = '60s'}).
POSTGRES_DEFAULTS: Mapping[str, str] = MappingProxyType(
    {
        "connect_timeout": "10",
        "keepalives": "1",
        "keepalives_idle": "30",
        "keepalives_interval": "10",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
    }
)


#: What C{application_name} of the gateway's PostgreSQL connections
#: begins with (L{gateway_application_name}), as C{pg_stat_activity}
#: shows it to the others on the same database.
APPLICATION_PREFIX = "openclaw "


def gateway_application_name(role: str) -> str:
    """
    The C{application_name} of one pool's PostgreSQL connections:
    L{APPLICATION_PREFIX}, C{role} (C{"standalone"}, or C{"cluster
    NAME"}: L{sharing_conflicts}), and the host, pid and a nonce that
    tell this process's own connections from the others' (at most 63
    bytes, what PostgreSQL keeps: NAMEDATALEN - 1).
    """
    # The process part survives whole and tells this process from every
    # other (two containers with one hostname each run the gateway as pid
    # 1: sharing trial s45): the host (at most 20 bytes), the pid and a
    # random nonce (called once per pool).  A role too long for the rest
    # is cut and ends with a digest of it, so that two long CLUSTER_NAMEs
    # that begin alike still differ.
    host = socket.gethostname().encode()[:20].decode(errors="ignore")
    process = f"{host}:{os.getpid()}/{os.urandom(3).hex()}"
    room = 63 - len(APPLICATION_PREFIX) - 1 - len(process.encode())
    if len(role.encode()) > room:
        digest = hashlib.sha256(role.encode()).hexdigest()[:8]
        role = role.encode()[: room - 9].decode(errors="ignore") + "~" + digest
    return f"{APPLICATION_PREFIX}{role} {process}"


def sharing_conflicts(own: str, others: Sequence[str]) -> list[str]:
    """
    Which of C{others} (the C{application_name} of the connections to the
    same database, L{gateway_application_name}'s) are another gateway's
    that must not share it with C{own}'s: any other gateway's for a
    standalone one (each loads the consumers once and hears of no change
    the other makes: a key revoked on one still works on the other), and
    for an instance of a cluster, any gateway not of its cluster (the
    instances of one tell each other their changes through Redis).
    Sorted, each once.
    """
    role, _, process = own.removeprefix(APPLICATION_PREFIX).rpartition(" ")
    found = set()
    for name in others:
        if not name.startswith(APPLICATION_PREFIX):
            continue
        their_role, _, their_process = name.removeprefix(APPLICATION_PREFIX).rpartition(" ")
        if their_process == process:
            continue
        if role == "standalone" or their_role != role:
            found.add(name)
    return sorted(found)


def database_identity(cursor: Any) -> str:
    """
    What tells the PostgreSQL database of C{cursor}'s connection from every
    other (L{ConsumerStore.identity}): 16 hex digits of a digest of its
    server's system identifier and its oid.
    """
    cursor.execute(
        "SELECT (SELECT system_identifier FROM pg_control_system()), oid FROM pg_database "
        "WHERE datname = current_database()"
    )
    system, oid = cursor.fetchone()
    return hashlib.sha256(f"{system}/{oid}".encode()).hexdigest()[:16]


def postgres_conninfo(database_url: str) -> str:
    """
    The libpq connection string for C{database_url}, with the
    L{POSTGRES_DEFAULTS} it does not set itself (its own
    C{?connect_timeout=...} and others win).

    @raise psycopg.ProgrammingError: C{database_url} is no connection
        string libpq can read.
    """
    parameters = conninfo_to_dict(database_url)
    for name, value in POSTGRES_DEFAULTS.items():
        parameters.setdefault(name, value)
    return make_conninfo("", **parameters)


#: How long L{ConsumerStore.close} waits for the pool's threads by
#: default, in seconds.
CLOSE_SECONDS = 10.0

#: How long a consumer command's transaction (a create, an update, a
#: delete, a key made or revoked) has to reach its commit, in seconds,
#: from when the command asks for it (a wait for a pool thread, and a
#: delete's for the usage rows being written, included): past it the
#: command fails saying nothing was changed, and the transaction is rolled
#: back whenever the database answers (L{ConsumerStore._command}).  Below
#: C{openclawctl}'s 10 s, with room for a cluster's announcement (5 s at
#: most, L{openclaw.consumers.shared.ANSWER_WAIT_SECONDS}).
COMMAND_SECONDS = 4.0
#: On PostgreSQL, a command's C{lock_timeout} and C{statement_timeout}
#: (C{SET LOCAL}: this transaction's only, which a pooler in transaction
#: mode takes), in milliseconds: the server gives up a lock another
#: session holds, or a statement, before L{COMMAND_SECONDS}, rolling the
#: transaction back and freeing its pool thread (the lock's first, to say
#: which).  The usage command's read gets the C{lock_timeout} only (a long
#: report may take longer); the usage rows' writes get neither (they
#: wait, and are kept meanwhile).
COMMAND_LOCK_TIMEOUT_MS = 2500
COMMAND_STATEMENT_TIMEOUT_MS = 3000


@attrs.frozen
class CommandBounds:
    """
    How long a consumer command may take (L{ConsumerStore._command}).
    """

    #: Seconds a command's transaction has to reach its commit.
    seconds: float = COMMAND_SECONDS
    #: On PostgreSQL, a command's (and the usage command's read's)
    #: C{lock_timeout}, in milliseconds.
    lock_timeout_ms: int = COMMAND_LOCK_TIMEOUT_MS
    #: On PostgreSQL, a command's C{statement_timeout}, in milliseconds.
    statement_timeout_ms: int = COMMAND_STATEMENT_TIMEOUT_MS


#: The waits between attempts of L{Retrying}, in seconds: 1, 2, 4, ...
#: up to 30 (plus up to 1 of jitter, so that gateways sharing a database
#: do not retry in step).
RETRY_FIRST_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


class _DaemonPool(adbapi.ConnectionPool):
    """
    adbapi's pool, its threads daemon threads (L{DaemonThread}) from the
    first: its constructor starts them at once when the reactor is
    running already (C{callWhenRunning}), before a caller could set the
    thread pool's C{threadFactory}; L{start} (public, what that call runs)
    sets it first.
    """

    def start(self) -> None:
        self.threadpool.threadFactory = DaemonThread
        super().start()


T = TypeVar("T")


_USAGE_COLUMNS = (
    "ts, day, consumer, key_prefix, provider, model, status, prompt_tokens, completion_tokens, "
    "reasoning_tokens, cost_usd, duration_ms, limited, requests, row_id"
)
#: The most row keys one query looks up (L{ConsumerStore._not_written}):
#: under SQLite's oldest bound on a statement's parameters (999).
_KEYS_PER_QUERY = 500


@attrs.define
class RowIds:
    """
    Keys for usage rows (L{UsageRow.row_id}): a prefix of 64 random bits
    made once per process (C{os.urandom}), and a count: unique to this
    process's rows, and to any other instance's (or an earlier run's) but
    by a chance of about one in 2**64 per run.  Called on the reactor's
    thread.
    """

    prefix: str = attrs.field(factory=lambda: os.urandom(8).hex() + "-")
    _count: Iterator[int] = attrs.field(factory=itertools.count, init=False)

    def __call__(self) -> str:
        return f"{self.prefix}{next(self._count)}"


@attrs.frozen
class UsageRow:
    """
    One request's usage, or C{requests} requests' summed (the calls of
    GATEWAY_API_KEYS' keys in one UTC minute, C{ts} the minute's start):
    C{ts} POSIX seconds; C{cost_usd} None when the model has no price;
    C{duration_ms} milliseconds; C{limited} when a limit refused it (it
    never reached a provider).

    C{created_at} is the consumer's (which consumer of that name made the
    call: one deleted and created again is another), not a column:
    L{ConsumerStore.record} writes the row under C{consumer} only while
    the database still has that consumer, else under its retired name
    (C{NAME@CREATED}) and adds no spend.  None: written as it is (the
    gateway's own keys' C{-}, rows already retired).

    C{row_id} is the row's key (L{RowIds}: unique to this process's rows,
    and to every other's), stored with it: a write of it tried again after
    its commit's answer was lost (the connection cut just after the
    C{COMMIT}: a pooler's or a primary's restart, a firewall) finds it
    written, and neither the row nor its cost is added twice (it
    was 135 rows and their spend for 72 calls).  None (a test's rows): written
    at every try.
    """

    ts: float
    consumer: str
    key_prefix: str
    provider: str
    model: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float | None = None
    duration_ms: float = 0.0
    limited: bool = False
    requests: int = 1
    created_at: float | None = None
    row_id: str | None = None

    def values(self, day: str | None = None) -> tuple[Any, ...]:
        """
        The row's columns, in L{_USAGE_COLUMNS}' order; C{day} is its UTC
        day (C{YYYY-MM-DD}) when the caller knows it already.
        """
        return (
            self.ts,
            period_key("day", self.ts) if day is None else day,
            self.consumer,
            self.key_prefix,
            self.provider,
            self.model,
            self.status,
            self.prompt_tokens,
            self.completion_tokens,
            self.reasoning_tokens,
            self.cost_usd,
            round(self.duration_ms, 3),
            1 if self.limited else 0,
            self.requests,
            self.row_id,
        )


@attrs.frozen
class Snapshot:
    """
    Everything the in-memory table holds, as read at start-up:
    C{keys} maps a key's SHA-256 to C{(consumer, prefix)}; C{spend} maps
    C{(consumer, period)} to US dollars for the periods now running.
    """

    consumers: dict[str, Consumer]
    keys: dict[str, tuple[str, str]]
    spend: dict[tuple[str, str], float]


def _open_sqlite(connection: sqlite3.Connection) -> None:
    connection.execute("PRAGMA busy_timeout=5000")
    # WAL is a property of the file, kept once set; turning it on needs the
    # file to itself, so another connection already on it makes this a no-op.
    if connection.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
        with contextlib.suppress(sqlite3.OperationalError):
            connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")


class _DeadConnection(Exception):
    """
    A pooled PostgreSQL connection failed its check before the transaction
    did anything (L{ConsumerStore._interact}): safe to try again.
    """


class PooledConnection:
    """
    A PostgreSQL connection of the pool (its C{connectionFactory}, a public
    hook), as L{adbapi.Connection} makes them, but for the rollback of one
    the server dropped (a restart, a database gone away): adbapi's logs
    C{Rollback failed} with a traceback twice for it (psycopg's error, then
    its own C{ConnectionLost}), each time, though the transaction's own
    failure already says it.  Here such a connection is closed and left
    (the thread's next transaction opens another) and the caller gets the
    transaction's failure alone.  A rollback failing otherwise still fails
    (adbapi logs it: a fault worth a traceback).
    """

    def __init__(self, pool: adbapi.ConnectionPool) -> None:
        self.pool = pool
        self.connection = pool.connect()

    def close(self) -> None:
        # As adbapi's: the pool closes its connections, a transaction does not.
        pass

    def rollback(self) -> None:
        try:
            self.connection.rollback()
        except psycopg.OperationalError:
            # Lost: the server ended its transaction with it.
            self.pool.disconnect(self.connection)

    def reconnect(self) -> None:
        # What adbapi's Transaction calls when a cursor cannot be made.
        self.pool.disconnect(self.connection)
        self.connection = self.pool.connect()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.connection, name)


class CommandTimedOut(Exception):
    """
    A consumer command's transaction did not reach its commit within
    C{seconds} (the store's C{bounds.seconds}, L{COMMAND_SECONDS} by
    default; the database held it: a lock another session holds, a
    database that stopped answering): given up, nothing was changed; it is
    rolled back whenever the database answers.
    """

    def __init__(self, seconds: float = COMMAND_SECONDS) -> None:
        super().__init__(seconds)
        #: The deadline it missed, in seconds.
        self.seconds = seconds


@attrs.define
class _Deadline:
    """
    Whether a command's transaction, run on a pool thread, may still
    commit: given up (L{give_up}, on the reactor thread, at the deadline)
    before its commit began, it raises L{CommandTimedOut} at its next
    step (and is rolled back); once its commit began, the deadline waits
    for it (a commit is the last round trip).
    """

    lock: threading.Lock = attrs.Factory(threading.Lock)
    abandoned: bool = False
    committing: bool = False

    def begin(self) -> None:
        with self.lock:
            if self.abandoned:
                raise CommandTimedOut()

    def commit(self) -> None:
        with self.lock:
            if self.abandoned:
                raise CommandTimedOut()
            self.committing = True

    def give_up(self) -> bool:
        """
        Give the transaction up unless its commit began: whether it was.
        """
        with self.lock:
            if self.committing:
                return False
            self.abandoned = True
            return True


class ConsumerExists(Exception):
    """
    A create found a consumer of its name in the database already: created
    meanwhile by another command or instance (its announcement not heard
    yet), or put there behind the gateway's back.  Nothing was written.
    C{str()} is its name.
    """


#: The errors of the two databases for a row a unique constraint refuses
#: (a consumer's name taken already): PostgreSQL's C{unique_violation}
#: (SQLSTATE 23505), SQLite's C{SQLITE_CONSTRAINT_PRIMARYKEY} and
#: C{SQLITE_CONSTRAINT_UNIQUE} (C{sqlite3.IntegrityError.sqlite_errorname},
#: Python 3.11).  Another constraint (a C{CHECK}, C{NOT NULL}) is not one.
_UNIQUE_SQLITE_ERRORS = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _taken(error: Exception) -> bool:
    """
    Whether C{error} is a unique constraint's refusal (L{_UNIQUE_SQLITE_ERRORS}).
    """
    if isinstance(error, sqlite3.IntegrityError):
        return getattr(error, "sqlite_errorname", None) in _UNIQUE_SQLITE_ERRORS
    return isinstance(error, psycopg.errors.UniqueViolation)


class NewerSchema(Exception):
    """
    The database's schema is of a later version of openclaw than this one
    (a downgrade): what this version would write or read there is not known
    to be right, so it is not used.
    """


#: What to do about L{NewerSchema}.
_NEWER_SCHEMA_ADVICE = (
    "run the later openclaw that upgraded it, or point DATABASE_URL (or STATE_DIR) at a database of this "
    "version (a backup made before the upgrade)"
)


def unreachable(reason: Failure) -> bool:
    """
    Whether C{reason} is the database's absence (PostgreSQL down,
    restarting, or a connection to it lost): the operator's to fix, logged
    in one line, where any other error (a fault of ours) is logged with its
    traceback (L{log_database_failure}).
    """
    return reason.check(psycopg.OperationalError, adbapi.ConnectionLost, _DeadConnection) is not None


def database_error(reason: Failure) -> str:
    """
    C{reason}'s description on one line: libpq's runs over two
    (C{...Connection refused\\n\\tIs the server running...}), joined
    with C{"; "} so that its sentences stay apart, each line's own
    whitespace made single spaces.
    """
    text = reason.getErrorMessage() or repr(reason.value)
    return "; ".join(line for line in (" ".join(part.split()) for part in text.splitlines()) if line)


def unwritten_error(reason: Failure) -> str:
    """
    What kept a change out of the database, on one line: L{database_error},
    but for the gateway's own L{CommandTimedOut} (C{"the database did not
    take it within 4 s"}) and L{DatabaseFileLost} (its file gone).
    """
    if isinstance(reason.value, CommandTimedOut):
        return f"the database did not take it within {reason.value.seconds:g} s"
    if isinstance(reason.value, DatabaseFileLost):
        return f"the database file {reason.value.path} was {reason.value.what} while the gateway runs"
    return database_error(reason)


_UNWRITABLE = "check that STATE_DIR and the database in it are readable and writable by the gateway's user"
_DAMAGED = (
    "the file is corrupt or not a SQLite database, or the disk failed to read it (SQLite says corrupt "
    "after an I/O error too: see dmesg); fix the disk first, then check the file with sqlite3 FILE "
    "'PRAGMA integrity_check', and only when it is not ok: stop the gateway, move it (and its -wal and -shm "
    "files) aside, and restore it from a backup (without one, the gateway makes a new, empty database: "
    "the consumers and their usage are gone)"
)

#: SQLite's primary result codes (U{https://www.sqlite.org/rescode.html})
#: that say its file cannot be used, the operator's to fix, and what to do
#: about each (L{database_advice}).
_SQLITE_FILE_ADVICE: Mapping[int, str] = MappingProxyType(
    {
        sqlite3.SQLITE_NOTADB: _DAMAGED,
        sqlite3.SQLITE_CORRUPT: _DAMAGED,
        sqlite3.SQLITE_READONLY: _UNWRITABLE,
        sqlite3.SQLITE_CANTOPEN: _UNWRITABLE,
        sqlite3.SQLITE_PERM: _UNWRITABLE,
        sqlite3.SQLITE_IOERR: "check the disk that holds STATE_DIR, and that STATE_DIR is writable",
        sqlite3.SQLITE_FULL: "free space on the filesystem that holds STATE_DIR",
        sqlite3.SQLITE_BUSY: "another process holds it locked: give each gateway a STATE_DIR of its own",
    }
)


def sqlite_file_advice(reason: Failure) -> str | None:
    """
    What to do about C{reason} when it is SQLite's saying its file cannot
    be used (L{_SQLITE_FILE_ADVICE}: full, not writable, corrupt, locked);
    else None.
    """
    # sqlite_errorcode: the extended result code, the primary in its low byte.
    code = getattr(reason.value, "sqlite_errorcode", None) if reason.check(sqlite3.Error) else None
    return None if code is None else _SQLITE_FILE_ADVICE.get(code & 0xFF)


#: How PostgreSQL refuses a connection's credentials (its messages for
#: SQLSTATE 28P01 and 28000; libpq's when it has no password to send).
_BAD_CREDENTIALS = re.compile(
    r"password authentication failed|no password supplied|role \S+ does not exist|authentication failed for user",
    re.IGNORECASE,
)
#: How PostgreSQL refuses a database that does not exist (SQLSTATE 3D000).
_NO_DATABASE = re.compile(r"database \S+ does not exist", re.IGNORECASE)


def database_advice(reason: Failure) -> str:
    """
    What the operator should check or do about C{reason}, a failed use of
    the database: for a SQLite file that cannot be used (corrupt, not a
    database, not writable, disk full: its result code), what fits it;
    else to check C{DATABASE_URL} or C{STATE_DIR}.
    """
    advice = sqlite_file_advice(reason)
    if advice is not None:
        return advice
    if reason.check(NewerSchema):
        return _NEWER_SCHEMA_ADVICE
    if reason.check(psycopg.Error, adbapi.ConnectionLost, _DeadConnection):
        said = str(reason.value)
        if _BAD_CREDENTIALS.search(said):
            # Not a PostgreSQL away: waiting will not help.
            return (
                "check the user name and password in DATABASE_URL (a password holding @ : / % # ? or a space "
                "must be percent-encoded in the URL: %40 %3A %2F %25 %23 %3F %20), then restart the gateway"
            )
        if _NO_DATABASE.search(said):
            return "check the database name in DATABASE_URL (or create it: createdb NAME), then restart the gateway"
        return "check DATABASE_URL (that PostgreSQL is running and reachable)"
    return "check DATABASE_URL (that PostgreSQL is running and reachable) or that STATE_DIR is writable"


def log_database_failure(
    log: Logger, format: str, reason: Failure, log_level: LogLevel = LogLevel.critical, **fields: Any
) -> None:
    """
    Log C{format} about a failed use of the database: one line when the
    database is unreachable (L{unreachable}) or its SQLite file cannot be
    used (corrupt, not writable: L{database_advice}), else with
    C{reason}'s traceback.  The line's C{error} field is C{reason}'s
    description (L{database_error}), its C{advice} field what to do
    (L{database_advice}).
    """
    fields.setdefault("advice", database_advice(reason))
    if unreachable(reason) or sqlite_file_advice(reason) is not None or reason.check(NewerSchema):
        log.emit(log_level, format, error=database_error(reason), **fields)
    else:
        log.failure(format, reason, log_level, error=database_error(reason), **fields)


#: The critical line of a SQLite database file removed (or replaced) under
#: the running gateway (L{DatabaseFileLost}), and the answer to each
#: consumer command that would change the database from then on.
DATABASE_FILE_LOST = (
    "the consumers' database {file} was {what} while the gateway runs (an rm, a cleaner of old files, a "
    "restore over it): the gateway still uses the file it opened, which nothing else can open and which is "
    "gone when it stops, so the consumer commands that change consumers or keys are refused from now on "
    "(nothing is changed: a restart would lose it); calls are still served and counted, their usage rows "
    "written to that file only (lost at the restart); the gateway copies what it holds beside it (its log "
    "says where): stop the gateway, move that copy to {path} (or put the database back from a backup, "
    "or leave it missing for a new, empty one: every consumer and key is then gone), then start it"
)
#: The line after L{DATABASE_FILE_LOST}: where the copy of what the gateway
#: held is (L{ConsumerStore.rescue}).
DATABASE_RESCUED = (
    "a copy of the consumers' database as the gateway holds it (every consumer, key and usage row written so "
    "far) is in {copy}: stop the gateway, then run: mv {copy} {path}, and start it; consumers changed from now "
    "on are refused, usage rows from now on are not in the copy"
)


class DatabaseFileLost(Exception):
    """
    The consumers' SQLite database (or its C{-wal} or C{-shm} file) is no
    longer at its path while the gateway uses it (L{ConsumerStore.check_file}):
    removed, or replaced by another file.  C{str()} is L{DATABASE_FILE_LOST},
    said.

    @ivar path: the file that went, as named.
    @ivar what: what became of it (L{openclaw.files.displaced}: C{"removed"},
        C{"replaced by another file"}).
    @ivar database: the database's own file (C{openclaw.db}), where its
        copy goes back (C{path} may be its C{-wal} or C{-shm}).
    """

    def __init__(self, path: Path, what: str, database: Path | None = None) -> None:
        self.database = path if database is None else database
        super().__init__(DATABASE_FILE_LOST.format(file=str(path), path=str(self.database), what=what))
        self.path = path
        self.what = what


class StoreNotStarted(Exception):
    """
    The consumers' store was used before its pool was made
    (L{ConsumerStore.start}; the gateway's: when its consumers start,
    L{openclaw.consumers.service.ConsumersService}), or started again once closed.
    """


class ConsumerStore:
    """
    The consumers, their keys' hashes, usage rows and spend, in a database.
    Every method returns a Deferred; none blocks the reactor.

    @param pool: the pool of connections (made already: its threads start
        once the reactor runs, made as its maker chose), or what makes it,
        called by L{start} (nothing is started before:
        L{ConsumerStore.open}'s C{start}, whose pools' threads are daemon
        threads: L{_DaemonPool}).
    @param bounds: how long a consumer command may take.
    """

    _log = Logger()

    def __init__(
        self,
        pool: adbapi.ConnectionPool | Callable[[], adbapi.ConnectionPool],
        dialect: str,
        reactor: IStoreReactor,
        bounds: CommandBounds = CommandBounds(),
    ) -> None:
        self._pool: adbapi.ConnectionPool | None = None
        self._make_pool: Callable[[], adbapi.ConnectionPool] | None = None
        if isinstance(pool, adbapi.ConnectionPool):
            self._pool = pool
        else:
            self._make_pool = pool
        #: C{"sqlite"} or C{"postgresql"}.
        self.dialect = dialect
        #: The pool's reactor (L{close} needs its threads and triggers).
        self.reactor = reactor
        self.bounds = bounds
        #: Set once L{migrate} found a later openclaw's schema: every use
        #: of the store then fails with it.
        self.newer_schema: NewerSchema | None = None
        # L{close}'s closing, once it was called (L{None}: never called):
        # each of its callers waits for it.
        self._closing: InFlight[bool] | None = None
        #: The SQLite database's path, whose file L{check_file} watches
        #: (L{open}'s; L{None}: none watched, PostgreSQL).
        self.database_path: Path | None = None
        #: On PostgreSQL, the C{application_name} of this process's
        #: connections (L{gateway_application_name}, once the pool is
        #: made: L{open}'s C{role}); L{None}: they are not named so.
        self.application_name: str | None = None
        #: The files of the SQLite database the pool's connection opened
        #: (the database, and its C{-wal} and C{-shm} once seen) and their
        #: C{stat}; read and written on the pool's only thread
        #: (C{cp_max=1}: L{_opened_sqlite}, L{_check_file}).
        self._held_files: dict[Path, os.stat_result] = {}
        #: The copy L{rescue} made of the database whose file was lost.
        self.rescued: Path | None = None
        #: Set once L{check_file} found the SQLite file gone from its
        #: path: every consumer command's change then fails with it.
        self.lost: DatabaseFileLost | None = None

    @property
    def pool(self) -> adbapi.ConnectionPool:
        """
        The pool of connections (L{twisted.enterprise.adbapi}).

        @raise StoreNotStarted: not made yet (L{start}).
        """
        if self._pool is None:
            raise StoreNotStarted("the consumers' database is not opened yet (ConsumerStore.start)")
        return self._pool

    @property
    def started(self) -> bool:
        """
        Whether the pool is made (L{start}, or given made).
        """
        return self._pool is not None

    def start(self) -> None:
        """
        Make the pool, when this store was given what makes it.  adbapi's
        C{ConnectionPool} asks its reactor, when made, to start it once
        running (at once when it runs already: its C{cp_min} threads) and
        to close it at the reactor's shutdown (a trigger L{close} takes
        back): so nothing of it may be made before the store is to be
        used.  Again, or given a pool made already: nothing.

        @raise StoreNotStarted: closed already (L{close}): a closed store
            is not opened again.
        """
        if self._pool is not None:
            return
        if self._closing is not None:
            raise StoreNotStarted("the consumers' database was closed: it is not opened again")
        assert self._make_pool is not None
        self._pool = self._make_pool()

    @classmethod
    def open(
        cls,
        database_url: str | None,
        state_dir: Path,
        reactor: IStoreReactor,
        bounds: CommandBounds = CommandBounds(),
        check_file: bool = True,
        start: bool = True,
        role: str | None = None,
    ) -> ConsumerStore:
        """
        The store C{DATABASE_URL} names (C{postgresql://...}), else SQLite
        in C{state_dir/openclaw.db}, its commands within C{bounds}.

        @param check_file: check that SQLite file now, creating it (private)
            if missing (L{sqlite_file}); C{False}: only name it, nothing
            read or made, for a caller that checks it itself before the
            store's first use (the gateway, at start).
        @param start: make its pool of connections now (L{start}: its
            threads start once the reactor runs); C{False}: nothing is
            made, or asked of the reactor, until L{start} (the gateway's,
            when its consumers start: L{openclaw.consumers.service.ConsumersService}).
        @param role: on PostgreSQL, the gateway's role on the database
            (L{gateway_application_name}): its connections are named by
            it, when C{DATABASE_URL} names them not, once the pool is made
            (this process's pid then: a daemon's, not its parent's), in
            L{application_name}; L{None}: not named.
        @raise UnusableDatabaseFile: that SQLite file cannot be used
            (L{sqlite_file}; only with C{check_file}).
        """
        make: Callable[[], adbapi.ConnectionPool]
        if database_url:
            conninfo = postgres_conninfo(database_url)
            named = role is not None and "application_name" not in conninfo_to_dict(database_url)

            def make() -> adbapi.ConnectionPool:
                if named:
                    assert role is not None
                    store.application_name = gateway_application_name(role)
                pool = _DaemonPool(
                    "psycopg",
                    conninfo=conninfo
                    if store.application_name is None
                    else make_conninfo(conninfo, application_name=store.application_name),
                    # No server-side prepared statements: behind a pooler in
                    # transaction mode (PgBouncer before 1.21) the next
                    # transaction may run on another server connection
                    # (https://www.psycopg.org/psycopg3/docs/advanced/prepare.html).
                    prepare_threshold=None,
                    cp_min=1,
                    cp_max=4,
                    cp_reconnect=True,
                    cp_reactor=reactor,
                )
                # Documented as any callable; mypy infers it from the default's type.
                pool.connectionFactory = PooledConnection  # type: ignore[assignment]
                return pool

            dialect = "postgresql"
        else:
            path = sqlite_file(state_dir) if check_file else sqlite_path(state_dir)

            def make() -> adbapi.ConnectionPool:
                return _DaemonPool(
                    "sqlite3",
                    str(path),
                    check_same_thread=False,
                    cp_min=1,
                    cp_max=1,
                    cp_openfun=store._opened_sqlite,
                    cp_reactor=reactor,
                )

            dialect = "sqlite"
        store = cls(make, dialect, reactor, bounds)
        if dialect == "sqlite":
            store.database_path = path
        if start:
            store.start()
        return store

    def _companions(self) -> tuple[Path, ...]:
        """
        The SQLite database's file and its C{-wal} and C{-shm} files (none
        without L{database_path}).
        """
        path = self.database_path
        if path is None:
            return ()
        return (path, *(path.with_name(path.name + suffix) for suffix in COMPANION_SUFFIXES))

    def _opened_sqlite(self, connection: sqlite3.Connection) -> None:
        """
        The pool's C{cp_openfun} for SQLite (the pool's thread): the
        connection set up (L{_open_sqlite}), and the files it opened
        noted, for L{check_file}.
        """
        _open_sqlite(connection)
        self._held_files.clear()
        self._note_files()

    def _note_files(self) -> None:
        # Those there and not noted yet: the -wal and -shm files are made
        # at the first use of the database in WAL mode.
        for name in self._companions():
            if name not in self._held_files:
                with contextlib.suppress(OSError):
                    self._held_files[name] = os.stat(name, follow_symlinks=False)

    def _check_file(self) -> DatabaseFileLost | None:
        """
        On the pool's thread: whether a file the connection opened
        (L{_held_files}) is no longer at its path (L{displaced}); the
        first found.
        """
        for name, held in self._held_files.items():
            what = displaced(name, held)
            if what is not None:
                return DatabaseFileLost(name, what, self.database_path)
        self._note_files()
        return None

    def check_file(self) -> Deferred[DatabaseFileLost | None]:
        """
        Check, on the pool's thread, that the SQLite database's files the
        connection opened (the database, its C{-wal} and C{-shm}) are
        still at their paths: one removed (an C{rm}, a C{rm -rf} of
        C{STATE_DIR}, a cleaner of old files) or replaced (a restore moved
        over it) leaves the gateway writing to a file that is gone at its
        stop, every change then lost.  The first time one is found, it is
        L{lost}, and every consumer command's change fails with it from
        then on (L{_command}); the usage rows are still written (to the
        file the gateway holds).

        @return: fires with the loss when this check found it (for the
            caller to log, once), else with L{None} (SQLite's files in
            place; found before; PostgreSQL; no connection yet; closing).
        """
        pool = self._pool
        if (
            self.lost is not None
            or self.database_path is None
            or pool is None
            or not pool.running
            or self._closing is not None
        ):
            return succeed(None)

        def found(lost: DatabaseFileLost | None) -> DatabaseFileLost | None:
            if lost is None or self.lost is not None or self._closing is not None:
                # Closing: SQLite removes its -wal and -shm files as it closes.
                return None
            self.lost = lost
            return lost

        return deferToThreadPool(self.reactor, pool.threadpool, self._check_file).addCallback(found)

    def _remove_lost_companions(self) -> list[tuple[Path, str]]:
        """
        Once the pool is closed (its thread), after the database's file
        was lost (L{lost}): move aside the C{-wal} and C{-shm} files still
        at their paths that are the lost database's (the same files the
        connection opened, L{_held_files}), to C{openclaw.db-wal.lost-<time>}.
        SQLite leaves them when it closes a database whose file was moved
        or removed, and the next open of whatever is then at the path (a
        backup or the rescued copy put back, a new database) would replay
        the lost one's pages onto it (a restored backup came
        back with the lost database's consumers).  Moved, not removed: a
        database moved away and never copied (a full disk) has its latest
        pages there only, which SQLite reads again once the three are put
        back together.

        @return: the files that could not be moved (an immutable one, a
            read-only file system), each with why, for L{said_stuck}.
        """
        path = self.database_path
        if self.lost is None or path is None:
            return []
        when = compact(time.time())
        stuck: list[tuple[Path, str]] = []
        for suffix in COMPANION_SUFFIXES:
            name = path.with_name(path.name + suffix)
            held = self._held_files.get(name)
            if held is not None and displaced(name, held) is None:
                try:
                    os.replace(name, name.with_name(f"{name.name}.lost-{when}"))
                except OSError as e:
                    stuck.append((name, e.strerror or str(e)))
        return stuck

    def said_stuck(self, stuck: list[tuple[Path, str]]) -> None:
        """
        Say (critical, one line each; reactor thread) the lost database's
        C{-wal} and C{-shm} files that could not be moved aside at the
        stop (L{_remove_lost_companions}): SQLite would replay them onto
        the next database put at the path (recheck s47: nothing was said).
        """
        for name, error in stuck:
            self._log.critical(
                "the lost consumers' database's {name} could not be moved aside at the stop ({error}): SQLite would "
                "replay it onto the next database put at {path} (a backup, the rescued copy); before starting the "
                "gateway again, move it aside yourself (chattr -i first if lsattr shows it immutable): mv {quoted} "
                "{quoted}.lost",
                name=str(name),
                error=error,
                path=str(self.database_path),
                quoted=shlex.quote(str(name)),
            )

    def rescue(self, when: str) -> Deferred[Path | None]:
        """
        Once the SQLite database's file is lost (L{lost}), copy the
        database the gateway still holds (every consumer, key and usage
        row written so far) to C{openclaw.db.rescued-<when>} beside where
        it was: SQLite's online backup (U{https://www.sqlite.org/backup.html},
        C{sqlite3.Connection.backup}) from the pool's connection, into a
        temporary file (mode 0600, C{mkstemp}) renamed into place; the
        directory made again (mode 0700) if it went with the file.  The
        operator moves it to C{openclaw.db} with the gateway stopped: the
        consumers and keys are not lost with the file.

        @param when: the time of the loss, as the copy's name ends
            (C{20261202T135900Z}).
        @return: fires with the copy's path, or L{None} (no loss, not
            SQLite, no pool); fails with the error of a copy that could not
            be made (nothing is left of it).
        """
        path, pool = self.database_path, self._pool
        if self.lost is None or self.rescued is not None or path is None or pool is None or not pool.running:
            return succeed(None)
        target = path.with_name(f"{path.name}{RESCUED_INFIX}{when}")

        def copy(connection: Any) -> Path:
            target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)

            def fill(descriptor: int, temporary: Path) -> None:
                os.close(descriptor)
                rescued = sqlite3.connect(temporary)
                try:
                    # adbapi's Connection hands the DB-API connection's
                    # methods on (sqlite3's backup among them), which
                    # commits the copy (flushed: SQLite's own fsync).
                    connection.backup(rescued)
                finally:
                    rescued.close()

            replace_atomically(target, fill)
            return target

        def made(copy: Path) -> Path:
            self.rescued = copy
            return copy

        return cast("Deferred[Path | None]", pool.runWithConnection(copy).addCallback(made))

    def _sql(self, query: str) -> str:
        # Written with qmark parameters (sqlite3's); psycopg takes %s.
        return query.replace("?", "%s") if self.dialect == "postgresql" else query

    def _interact(self, function: Callable[..., T], *args: Any) -> Deferred[T]:
        """
        C{function(transaction, *args)} in one transaction.  On PostgreSQL
        the transaction first checks its connection (C{SELECT 1}): one the
        server dropped (a restart, an idle timeout) fails there, before
        anything was written, and the interaction is tried again on
        another connection (each dead one is let go at its rollback:
        L{PooledConnection}), up to once per pooled connection.  A failure
        after that check is never retried: a write whose commit was cut
        may have been applied, and must not be applied twice.
        """
        if self.newer_schema is not None:
            # A later openclaw's database: nothing is read or written.
            return fail(self.newer_schema)
        if self._pool is None:
            return fail(StoreNotStarted("the consumers' database is not opened yet (ConsumerStore.start)"))
        if self.dialect != "postgresql":
            return cast("Deferred[T]", self.pool.runInteraction(function, *args))

        def checked(transaction: Any, *args: Any) -> T:
            try:
                transaction.execute("SELECT 1")
            except psycopg.OperationalError as e:
                raise _DeadConnection(str(e)) from e
            return function(transaction, *args)

        def again(failure: Failure, tries: int) -> Deferred[T]:
            failure.trap(_DeadConnection)
            retried = cast("Deferred[T]", self.pool.runInteraction(checked, *args))
            if tries > 1:
                retried.addErrback(again, tries - 1)
            return retried

        done = cast("Deferred[T]", self.pool.runInteraction(checked, *args))
        # Each of the pool's threads has a connection of its own, and each
        # may be dead: as many tries as there are connections.
        return done.addErrback(again, self.pool.max)

    def _command(self, function: Callable[..., T], *args: Any, after: Deferred[None] | None = None) -> Deferred[T]:
        """
        L{_interact} for a consumer command's change, bounded: it fails
        with L{CommandTimedOut} when the transaction has not reached its
        commit within C{bounds.seconds} (nothing was changed: it is given
        up, and rolled back when the database answers), and on PostgreSQL
        the server gives up a lock wait or a statement after
        C{bounds.lock_timeout_ms} and C{bounds.statement_timeout_ms}
        (C{SET LOCAL}, this transaction's only).  A
        commit under way at the deadline is waited for.

        @param after: what the transaction must wait for first (a delete:
            the usage rows being written), within the same deadline.
        """
        if self.lost is not None:
            # Its file gone from STATE_DIR: a change made now is lost at
            # the restart.
            return fail(self.lost)
        deadline = _Deadline()
        answer: Deferred[T] = Deferred()

        def bounded(cursor: Any, *args: Any) -> T:
            deadline.begin()
            if self.dialect == "postgresql":
                cursor.execute(f"SET LOCAL lock_timeout = {int(self.bounds.lock_timeout_ms)}")
                cursor.execute(f"SET LOCAL statement_timeout = {int(self.bounds.statement_timeout_ms)}")
            result = function(cursor, *args)
            deadline.commit()
            return result

        def start(_: object) -> Deferred[Any]:
            if deadline.abandoned:
                return succeed(None)
            return self._interact(bounded, *args)

        def late() -> None:
            if deadline.give_up():
                answer.errback(CommandTimedOut(self.bounds.seconds))

        timer = self.reactor.callLater(self.bounds.seconds, late)

        def ended(result: Any) -> None:
            if timer.active():
                timer.cancel()
            if answer.called:
                # Answered already: given up, and rolled back now.
                return
            if isinstance(result, Failure):
                answer.errback(result)
            else:
                answer.callback(result)

        waiting: Deferred[Any] = after if after is not None else succeed(None)
        waiting.addCallback(start).addBoth(ended)
        return answer

    def close(self, timeout: float = CLOSE_SECONDS) -> Deferred[bool]:
        """
        Close the pool's connections and stop its threads, off the reactor
        thread: fires with C{True} once done, C{False} when C{timeout}
        seconds passed first (a thread still blocked connecting to or
        waiting on the database; a daemon thread, it ends with the
        process).

        L{adbapi.ConnectionPool.close}, and the reactor's shutdown trigger
        it registers, join the pool's threads on the reactor thread, which
        hangs there for as long as one is blocked: the trigger is removed
        here, and L{adbapi.ConnectionPool.finalClose} runs on a thread of
        its own.

        Called again (while the first close is under way, or after), it
        closes nothing more and fires with the first's result (its
        C{timeout} is the first's).
        """
        closing = self._closing
        if closing is None:
            closing = self._closing = InFlight()
            self._close(timeout).addBoth(closing.end)
        return closing.observe()

    def _close(self, timeout: float) -> Deferred[bool]:
        pool = self._pool
        if pool is None:
            # Never made (L{start}): nothing to close.
            return succeed(True)
        if not pool.running:
            # Never started (the reactor never ran): no thread to join;
            # its start once running is taken back.
            pool.close()
            return succeed(True)
        reactor = self.reactor
        if pool.shutdownID is not None:
            reactor.removeSystemEventTrigger(pool.shutdownID)
        closed: Deferred[bool] = Deferred()

        def close_pool() -> None:
            try:
                pool.finalClose()
                stuck = self._remove_lost_companions()
            except BaseException:
                reactor.callFromThread(closed.errback, Failure())
            else:
                if stuck:
                    reactor.callFromThread(self.said_stuck, stuck)
                reactor.callFromThread(closed.callback, True)

        threading.Thread(target=close_pool, name="openclaw-consumer-store-close", daemon=True).start()

        def late(reason: Failure) -> bool:
            reason.trap(DeferredTimeoutError)
            return False

        return closed.addTimeout(timeout, reactor).addErrback(late)

    # -- schema ---------------------------------------------------------------

    def migrate(self) -> Deferred[int]:
        """
        Apply the migrations the database lacks; fires with the schema
        version it is now at.  Fails with L{NewerSchema} for a database a
        later openclaw upgraded, and from then on every use of the store
        fails with it (no usage row written, none purged).
        """

        def newer(reason: Failure) -> Failure:
            if reason.check(NewerSchema):
                self.newer_schema = cast(NewerSchema, reason.value)
            return reason

        return self._interact(self._migrate).addErrback(newer)

    def _migrate(self, cursor: Any) -> int:
        # Two gateways starting at once on one database: one migrates, the
        # other waits for it, then finds the schema up to date.
        if self.dialect == "postgresql":
            cursor.execute("SELECT pg_advisory_xact_lock(1919191919)")
        else:
            # The write lock now, before the version is read (sqlite3 would
            # only begin a transaction at the first INSERT).
            cursor.execute("BEGIN IMMEDIATE")
        cursor.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        cursor.execute("SELECT version FROM schema_version")
        row = cursor.fetchone()
        version = 0 if row is None else int(row[0])
        if row is None:
            cursor.execute("INSERT INTO schema_version (version) VALUES (0)")
        if version > len(MIGRATIONS):
            raise NewerSchema(
                f"it is at schema version {version}, which a later openclaw wrote; this one knows versions up "
                f"to {len(MIGRATIONS)}"
            )
        for number, statements in enumerate(MIGRATIONS[version:], start=version + 1):
            for statement in statements:
                cursor.execute(statement)
            cursor.execute(self._sql("UPDATE schema_version SET version = ?"), (number,))
            version = number
        if self.database_path is not None:
            # The -wal and -shm this connection made at its first write,
            # noted as its own (L{_remove_lost_companions}).
            self._note_files()
        return version

    # -- consumers and keys ---------------------------------------------------

    def load(self, now: float) -> Deferred[Snapshot]:
        """
        Every consumer, key hash, and the spend of the periods running at
        C{now}.
        """
        return self._interact(self._load, now)

    def _load(self, cursor: Any, now: float) -> Snapshot:
        cursor.execute(f"SELECT {_CONSUMER_COLUMNS} FROM consumers")
        consumers = {row[0]: _consumer(row) for row in cursor.fetchall()}
        cursor.execute("SELECT hash, consumer, prefix FROM consumer_keys")
        keys = {row[0]: (row[1], row[2]) for row in cursor.fetchall()}
        periods = tuple({period_key(p, now) for p in ("day", "month", "total")})
        # Only the consumers' (not a deleted one's, left by an earlier version).
        cursor.execute(
            self._sql(
                "SELECT consumer, period, usd FROM spend WHERE period IN (?, ?, ?) "
                "AND consumer IN (SELECT name FROM consumers)"
            ),
            periods,
        )
        spend = {(row[0], row[1]): float(row[2]) for row in cursor.fetchall()}
        return Snapshot(consumers, keys, spend)

    def create(self, consumer: Consumer, key_hash: str, prefix: str) -> Deferred[None]:
        """
        Write a new consumer and its first key.

        @raise ConsumerExists: (in the Deferred) the database has a
            consumer of its name already (another command's or instance's,
            committed first, or one it was waiting for: the loser of two
            creates at once); nothing was written.
        """
        return self._command(self._create, consumer, key_hash, prefix)

    def _create(self, cursor: Any, consumer: Consumer, key_hash: str, prefix: str) -> None:
        try:
            cursor.execute(
                self._sql(f"INSERT INTO consumers ({_CONSUMER_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"),
                _consumer_values(consumer),
            )
        except (sqlite3.IntegrityError, psycopg.IntegrityError) as e:
            if not _taken(e):
                raise
            # Its name, the one key: the transaction is rolled back.
            raise ConsumerExists(consumer.name) from e
        # A new consumer starts from nothing, whatever a deleted one of its
        # name left (record adds spend only to a consumer that exists): no
        # key of a deleted one opens it, even one an older version left.
        # After the insert: one of a consumer that exists is never touched.
        cursor.execute(self._sql("DELETE FROM spend WHERE consumer = ?"), (consumer.name,))
        cursor.execute(self._sql("DELETE FROM consumer_keys WHERE consumer = ?"), (consumer.name,))
        self._insert_key(cursor, consumer.name, key_hash, prefix, consumer.created_at)

    def update(self, consumer: Consumer, fields: Mapping[str, Any]) -> Deferred[Consumer | None]:
        """
        Change the fields a command's C{fields} names (its C{data}:
        C{name} and any of C{budget_usd}, C{budget_period}, C{rpm},
        C{tpm}, C{models}, C{expires_at}, as
        L{openclaw.consumers.model.consumer_fields} reads them) of
        C{consumer} (its name and C{created_at}: which one), in one
        transaction that reads its row as the database holds it now
        (locked: on PostgreSQL C{FOR NO KEY UPDATE}, on SQLite the write
        lock from the read on), checks the fields against it and writes
        those fields only: another instance's change of other fields,
        which this instance's copy may not show yet, is kept.

        Fires with the consumer as the database holds it after the
        change, or None when it was not there to change (deleted
        meanwhile, perhaps created again since, by another command or
        instance).

        @raise InvalidConsumer: (in the Deferred) C{fields} do not go with
            the fields the database has (a C{budget_period} for a consumer
            whose budget another change removed); nothing was written.
        """
        return self._command(self._update, consumer, dict(fields))

    def _update(self, cursor: Any, consumer: Consumer, fields: Mapping[str, Any]) -> Consumer | None:
        if self.dialect == "sqlite":
            # The read and the write atomically (the write lock from the
            # read on: another process on the file waits, busy_timeout).
            cursor.execute("BEGIN IMMEDIATE")
        # NO KEY UPDATE: the lock an UPDATE of these columns takes, taken at
        # the read; a concurrent update waits for this one's commit and
        # reads what it wrote, a delete waits too, and the usage rows'
        # writes (FOR KEY SHARE, L{_identified}) do not.
        lock = " FOR NO KEY UPDATE" if self.dialect == "postgresql" else ""
        current = self._read_consumer(cursor, consumer.name, lock)
        if current is None or current.created_at != creation_time(consumer.created_at):
            return None
        changed = _consumer_values(consumer_fields(fields, current))
        columns = [
            (column, value)
            for column, value in zip(_CONSUMER_FIELDS, changed, strict=True)
            if column in fields and column != "name"
        ]
        if not columns:
            return current
        cursor.execute(
            self._sql(f"UPDATE consumers SET {', '.join(f'{c} = ?' for c, _ in columns)} WHERE name = ?"),
            (*(value for _, value in columns), consumer.name),
        )
        return self._read_consumer(cursor, consumer.name)

    def _read_consumer(self, cursor: Any, name: str, lock: str = "") -> Consumer | None:
        """
        Consumer C{name} as the database holds it, None when it has no
        such row; C{lock} is a locking clause (PostgreSQL's C{FOR ...}).
        """
        cursor.execute(self._sql(f"SELECT {_CONSUMER_COLUMNS} FROM consumers WHERE name = ?{lock}"), (name,))
        row = cursor.fetchone()
        return None if row is None else _consumer(row)

    def _live(self, cursor: Any, name: str, created_at: float) -> bool:
        """
        Whether the database has consumer C{name} created at C{created_at}.
        On PostgreSQL its row is read C{FOR KEY SHARE}: a delete waits for
        this transaction (and then takes what it wrote, a key, with it); a
        delete committed first leaves no row.  SQLite's writes are one at
        a time.
        """
        lock = " FOR KEY SHARE" if self.dialect == "postgresql" else ""
        cursor.execute(self._sql(f"SELECT created_at FROM consumers WHERE name = ?{lock}"), (name,))
        row = cursor.fetchone()
        return row is not None and creation_time(row[0]) == creation_time(created_at)

    def delete(self, name: str, retired: str, after: Deferred[None] | None = None) -> Deferred[None]:
        """
        Delete the consumer C{name}, its keys and its spend; its usage rows
        are kept, renamed C{retired} (L{openclaw.consumers.model.retired_name}),
        so that a consumer created again under C{name} starts from nothing.

        @param after: a write of usage rows to wait for first, within the
            command's deadline (L{_command}).
        """
        return self._command(self._delete, name, retired, after=after)

    def _delete(self, cursor: Any, name: str, retired: str) -> None:
        # The consumer's row first: on PostgreSQL its delete waits for a
        # key being added (L{_live}'s FOR KEY SHARE) to commit, so that the
        # keys' delete sees that key too; the other way round, it outlived
        # its consumer.
        cursor.execute(self._sql("DELETE FROM consumers WHERE name = ?"), (name,))
        cursor.execute(self._sql("DELETE FROM consumer_keys WHERE consumer = ?"), (name,))
        cursor.execute(self._sql("DELETE FROM spend WHERE consumer = ?"), (name,))
        cursor.execute(self._sql("UPDATE usage_rows SET consumer = ? WHERE consumer = ?"), (retired, name))

    def add_key(self, consumer: Consumer, key_hash: str, prefix: str, now: float) -> Deferred[bool]:
        """
        Give C{consumer} another key; fires with whether it was there to
        take it (L{_live}).  A key written for a consumer deleted meanwhile
        would outlive it, and open a consumer created again under its name.
        """
        return self._command(self._add_key, consumer, key_hash, prefix, now)

    def _add_key(self, cursor: Any, consumer: Consumer, key_hash: str, prefix: str, now: float) -> bool:
        if not self._live(cursor, consumer.name, consumer.created_at):
            return False
        self._insert_key(cursor, consumer.name, key_hash, prefix, now)
        return True

    def _insert_key(self, cursor: Any, name: str, key_hash: str, prefix: str, now: float) -> None:
        cursor.execute(
            self._sql("INSERT INTO consumer_keys (hash, prefix, consumer, created_at) VALUES (?, ?, ?, ?)"),
            (key_hash, prefix, name, now),
        )

    def revoke_key(self, name: str, prefix: str) -> Deferred[int]:
        """
        Delete the consumer's keys listed by C{prefix}; fires with how many.
        """
        return self._command(self._revoke_key, name, prefix)

    def _revoke_key(self, cursor: Any, name: str, prefix: str) -> int:
        cursor.execute(self._sql("DELETE FROM consumer_keys WHERE consumer = ? AND prefix = ?"), (name, prefix))
        return int(cursor.rowcount)

    # -- usage and spend ------------------------------------------------------

    def record(self, rows: Sequence[UsageRow]) -> Deferred[None]:
        """
        Write a batch of usage rows and add their costs to the spend of
        their day, month and total, in one transaction.
        """
        return self._interact(self._record, rows)

    def _record(self, cursor: Any, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        if self.dialect == "sqlite":
            # The check of the consumers and the writes, atomically (the
            # write lock from the first read on).
            cursor.execute("BEGIN IMMEDIATE")
        rows = self._not_written(cursor, self._identified(cursor, rows))
        if not rows:
            return
        # The UTC day once per day in the batch, not once per row.
        days: dict[int, str] = {}
        values = []
        for row in rows:
            number = int(row.ts // 86400)
            day = days.get(number)
            if day is None:
                day = days[number] = period_key("day", number * 86400)
            values.append(row.values(day))
        cursor.executemany(
            self._sql(f"INSERT INTO usage_rows ({_USAGE_COLUMNS}) VALUES ({', '.join('?' * 15)})"),
            values,
        )
        spend: dict[tuple[str, str], float] = {}
        for row in rows:
            # A deleted consumer's (retired) rows add to nobody's spend.
            if row.cost_usd and row.consumer != NO_CONSUMER and not is_retired_name(row.consumer):
                for period in ("day", "month", "total"):
                    key = (row.consumer, period_key(period, row.ts))
                    spend[key] = spend.get(key, 0.0) + row.cost_usd
        self._add_spend(cursor, spend)

    def _not_written(self, cursor: Any, rows: Sequence[UsageRow]) -> Sequence[UsageRow]:
        """
        C{rows} but those the database holds already (by L{UsageRow.row_id}):
        a batch tried again whose first write was committed, though its
        answer never came.  Read in the transaction that writes the rest
        (an instance writes one batch at a time:
        L{ConsumerTable.flush <openclaw.consumers.table.ConsumerTable.flush>}).
        """
        keys = [row.row_id for row in rows if row.row_id is not None]
        written: set[str] = set()
        for start in range(0, len(keys), _KEYS_PER_QUERY):
            chunk = keys[start : start + _KEYS_PER_QUERY]
            cursor.execute(
                # "IS NOT NULL" lets both databases use the partial index.
                self._sql(
                    f"SELECT row_id FROM usage_rows WHERE row_id IS NOT NULL AND row_id IN ({', '.join('?' * len(chunk))})"
                ),
                tuple(chunk),
            )
            written.update(row[0] for row in cursor.fetchall())
        if not written:
            return rows
        return [row for row in rows if row.row_id not in written]

    def _identified(self, cursor: Any, rows: Sequence[UsageRow]) -> Sequence[UsageRow]:
        """
        C{rows}, those of a consumer the database no longer has (deleted,
        perhaps created again since: another C{created_at}) under its
        retired name, as L{delete} renamed those written before.

        On PostgreSQL the consumers' rows are read C{FOR KEY SHARE}: a delete
        (C{DELETE FROM consumers}) waits for this transaction, so its
        renaming sees these rows; a delete committed first leaves no row
        to read, and they are retired here.
        """
        names = sorted({row.consumer for row in rows if row.created_at is not None})
        if not names:
            return rows
        lock = " FOR KEY SHARE" if self.dialect == "postgresql" else ""
        cursor.execute(
            self._sql(f"SELECT name, created_at FROM consumers WHERE name IN ({', '.join('?' * len(names))}){lock}"),
            tuple(names),
        )
        live = {(row[0], creation_time(row[1])) for row in cursor.fetchall()}
        return [
            row
            if row.created_at is None or (row.consumer, row.created_at) in live
            else attrs.evolve(
                row,
                consumer=retired_name(Consumer(row.consumer, created_at=row.created_at)),
                created_at=None,
            )
            for row in rows
        ]

    def _add_spend(self, cursor: Any, spend: dict[tuple[str, str], float]) -> None:
        if spend:
            cursor.executemany(
                self._sql(
                    "INSERT INTO spend (consumer, period, usd) VALUES (?, ?, ?) "
                    "ON CONFLICT (consumer, period) DO UPDATE SET usd = spend.usd + excluded.usd"
                ),
                [(consumer, period, usd) for (consumer, period), usd in sorted(spend.items())],
            )

    def purge(self, before: float) -> Deferred[int]:
        """
        Delete the usage rows older than C{before} (POSIX seconds); fires
        with how many went.
        """
        return self._interact(self._purge, before)

    def _purge(self, cursor: Any, before: float) -> int:
        cursor.execute(self._sql("DELETE FROM usage_rows WHERE ts < ?"), (before,))
        purged = int(cursor.rowcount)
        # Spends no consumer has (a deleted one's, left under its retired
        # name by an earlier version) are never read: they go too.
        cursor.execute("DELETE FROM spend WHERE consumer NOT IN (SELECT name FROM consumers)")
        return purged

    def identity(self) -> Deferred[str | None]:
        """
        On PostgreSQL, what tells this database from every other: a digest
        of its server's system identifier (C{pg_control_system()}, the
        same through every address and pooler of the server) and the
        database's oid, 16 hex digits.  None on SQLite, or when the server
        will not say (a role refused the function: logged by the caller).
        """
        if self.dialect != "postgresql":
            return succeed(None)
        return self._interact(database_identity)

    def gateways_sharing(self) -> Deferred[list[str]]:
        """
        On PostgreSQL with named connections (L{application_name}), the
        other gateways' connections to the same database that must not
        share it with this one (L{sharing_conflicts}: their
        C{application_name}s, from C{pg_stat_activity}, which shows every
        role's); none elsewhere.
        """
        own = self.application_name
        if own is None or self.dialect != "postgresql":
            return succeed([])

        def read(cursor: Any) -> list[str]:
            cursor.execute(
                "SELECT DISTINCT application_name FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE %s",
                (APPLICATION_PREFIX + "%",),
            )
            return sharing_conflicts(own, [row[0] for row in cursor.fetchall()])

        return self._interact(read)

    def usage(
        self,
        name: str | None,
        since: float | None,
        until: float | None,
        group_by: str | None,
        retired: bool = False,
    ) -> Deferred[list[dict[str, Any]]]:
        """
        Requests, tokens and cost of the rows from C{since} (inclusive) to
        C{until} (exclusive), for one consumer or all, in one total or one
        row per C{group_by} (C{consumer}, C{model} or C{day}).  With
        C{retired}, C{name}'s rows include those of the deleted consumers
        of that name (C{NAME@CREATED}).
        """
        return self._interact(self._usage, name, since, until, group_by, retired)

    def _usage(
        self,
        cursor: Any,
        name: str | None,
        since: float | None,
        until: float | None,
        group_by: str | None,
        retired: bool = False,
    ) -> list[dict[str, Any]]:
        if self.dialect == "postgresql":
            # A lock another session holds on the table is not waited for
            # past the command's bound (C{bounds.lock_timeout_ms}).
            cursor.execute(f"SET LOCAL lock_timeout = {int(self.bounds.lock_timeout_ms)}")
        where: list[str] = []
        params: list[Any] = []
        if name is not None and retired:
            # NAME and NAME@...: a range ('A' follows '@') that SQLite's
            # (consumer, ts) index serves; on PostgreSQL compared bytewise
            # (its collation may order punctuation otherwise), which that
            # index cannot serve: a scan, for an operator's report.
            collate = ' COLLATE "C"' if self.dialect == "postgresql" else ""
            where.append(f"(consumer = ? OR (consumer{collate} >= ? AND consumer{collate} < ?))")
            params.extend((name, name + "@", name + "A"))
            name = None
        for clause, value in (("consumer = ?", name), ("ts >= ?", since), ("ts < ?", until)):
            if value is not None:
                where.append(clause)
                params.append(value)
        column = {"consumer": "consumer", "model": "provider || '/' || model", "day": "day"}.get(group_by or "")
        query = (
            ("SELECT " + (f"{column} AS grp, " if column else "'' AS grp, "))
            + "SUM(CASE WHEN limited = 0 THEN requests ELSE 0 END), SUM(limited * requests), "
            "SUM(CASE WHEN limited = 0 THEN prompt_tokens ELSE 0 END), "
            "SUM(CASE WHEN limited = 0 THEN completion_tokens ELSE 0 END), "
            "SUM(CASE WHEN limited = 0 THEN reasoning_tokens ELSE 0 END), "
            "SUM(cost_usd), "
            "SUM(CASE WHEN cost_usd IS NULL AND limited = 0 THEN prompt_tokens + completion_tokens ELSE 0 END) "
            "FROM usage_rows"
            + (" WHERE " + " AND ".join(where) if where else "")
            + (" GROUP BY grp ORDER BY grp" if column else "")
        )
        cursor.execute(self._sql(query), tuple(params))
        rows = []
        for row in cursor.fetchall():
            document: dict[str, Any] = {group_by: row[0]} if column and group_by else {}
            document.update(
                requests=int(row[1] or 0),
                limited=int(row[2] or 0),
                prompt_tokens=int(row[3] or 0),
                completion_tokens=int(row[4] or 0),
                reasoning_tokens=int(row[5] or 0),
                cost_usd=None if row[6] is None else round(float(row[6]), 10),
                unpriced_tokens=int(row[7] or 0),
            )
            if document["cost_usd"] is None and not document["unpriced_tokens"]:
                # Nothing counted that lacked a price: nothing owed.
                document["cost_usd"] = 0.0
            rows.append(document)
        return rows


class Retrying(Generic[T]):
    """
    Call C{attempt} until the Deferred it returns succeeds, waiting after
    each failure as C{policy} says (by default Twisted's
    L{backoffPolicy}: L{RETRY_FIRST_SECONDS}, doubling up to
    L{RETRY_MAX_SECONDS}, plus jitter).

    @param failed: called with each failure and how many attempts in a row
        have failed (1 for the first of an outage), and the seconds until
        the next.
    @param succeeded: called with the result and how many attempts failed
        before it.
    @ivar done: fires with C{attempt}'s result once one succeeds (never if
        L{stop}ped first).
    """

    def __init__(
        self,
        attempt: Callable[[], Deferred[T]],
        clock: IReactorTime,
        failed: Callable[[Failure, int, float], None],
        succeeded: Callable[[T, int], None],
        policy: Callable[[int], float] | None = None,
    ) -> None:
        self.attempt = attempt
        self.clock = clock
        self.failed = failed
        self.succeeded = succeeded
        self.policy = policy or backoffPolicy(RETRY_FIRST_SECONDS, RETRY_MAX_SECONDS, factor=2.0)
        self.failures = 0
        self.done: Deferred[T] = Deferred()
        self._trying: Deferred[T] | None = None
        self._waiting: IDelayedCall | None = None
        self._stopped = False

    def start(self) -> None:
        """
        Make the first attempt now.
        """
        self._waiting = None
        if self._stopped:
            return
        trying = self._trying = maybeDeferred(self.attempt)
        trying.addCallbacks(self._succeeded, self._failed)

    def _succeeded(self, result: T) -> None:
        self._trying = None
        self.succeeded(result, self.failures)
        self.done.callback(result)

    def _failed(self, reason: Failure) -> None:
        self._trying = None
        if self._stopped:
            return
        self.failures += 1
        delay = self.policy(self.failures - 1)
        self.failed(reason, self.failures, delay)
        self._waiting = self.clock.callLater(delay, self.start)

    def stop(self) -> None:
        """
        Make no more attempts: the wait for the next is cancelled, an
        attempt under way too (its result is ignored).
        """
        self._stopped = True
        if self._waiting is not None and self._waiting.active():
            self._waiting.cancel()
        self._waiting = None
        if self._trying is not None:
            self._trying.cancel()


class UnusableDatabaseFile(OSError):
    """
    The SQLite database's file cannot be created, opened for writing or
    made private (L{sqlite_file}); the message names it, says why and what
    to do.
    """


#: What SQLite adds to the database's name for its write-ahead log and
#: shared-memory index (U{https://www.sqlite.org/tempfiles.html}).
COMPANION_SUFFIXES = ("-wal", "-shm")
#: Between the database's name and the time in a rescued copy's name
#: (L{ConsumerStore.rescue}): C{openclaw.db.rescued-20261202T135900Z}.
RESCUED_INFIX = ".rescued-"


#: The consumers' SQLite database's name in C{STATE_DIR}.
DATABASE_FILE = "openclaw.db"


def sqlite_path(state_dir: Path) -> Path:
    """
    Where the consumers' SQLite database is: C{state_dir}'s
    L{DATABASE_FILE} (whether or not it is there yet).
    """
    return state_dir / DATABASE_FILE


def remove_new_database(path: Path) -> None:
    """
    Remove the consumers' database made at start-up (L{sqlite_file}) when
    start-up is refused after all: a regular file still empty (no process
    has begun to use it), not followed if a link.  Nothing is said of one
    that cannot be removed: the refusal is the line to show.
    """
    try:
        info = os.lstat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size == 0:
            os.unlink(path)
    except OSError:
        pass


def sqlite_file(state_dir: Path, euid: int | None = None) -> Path:
    """
    The SQLite database in C{state_dir} (C{openclaw.db}), created if
    missing and made private (L{private}), checked before the pool opens it
    so that start-up can refuse it in one line.

    @param euid: the gateway's user id (default: this process's).
    @raise UnusableDatabaseFile: it, or its C{-wal} or C{-shm} file, is
        not a regular file (a symbolic link, which is never followed; a
        directory or a FIFO in the way), belongs to another user, or cannot
        be opened for writing or have its mode set (permission denied,
        immutable).
    """
    path = sqlite_path(state_dir)
    try:
        private(path, euid)
    except NotARegularFile as e:
        name = str(e.filename) if e.filename is not None else str(path)
        # Its -wal or -shm file is named.
        which = "" if name == str(path) else f"{name!r}: "
        if e.kind == "a symbolic link":
            reason = f"{which}a symbolic link, which the gateway does not follow"
            advice = "remove the link (and put the file it points to in its place, if that file is yours)"
        else:
            reason = f"{which}{e.kind} is in the way"
            advice = "move it aside (the gateway creates the file itself)"
        raise UnusableDatabaseFile(
            f"the consumers' database {str(path)!r} cannot be used ({reason}): {advice}"
        ) from None
    except UnusableDatabaseFile:
        raise
    except OSError as e:
        what = e.strerror or str(e)
        if e.filename is not None and str(e.filename) != str(path):
            # Its -wal or -shm file.
            what = f"{str(e.filename)!r}: {what}"
        if isinstance(e, PermissionError):
            advice = (
                "give the gateway's user read and write access to it and its -wal and -shm files (owned by "
                "that user, mode 0600; chattr -i if lsattr shows one immutable)"
            )
        else:
            advice = "make it a regular file the gateway's user can read and write"
        raise UnusableDatabaseFile(f"the consumers' database {str(path)!r} cannot be used ({what}): {advice}") from None
    return path


def private(path: Path, euid: int | None = None) -> None:
    """
    Make the SQLite database at C{path} readable by its owner only (mode
    0600; it holds key hashes and usage), creating it empty if need be.
    SQLite gives the C{-wal} and C{-shm} files it makes the database's
    mode (U{https://www.sqlite.org/tempfiles.html}); those already there
    are set too.

    No symbolic link is followed: each file is opened with C{O_NOFOLLOW}
    (and without waiting on a FIFO, L{openclaw.files.open_regular_file}),
    and its mode set through that descriptor (C{fchmod}), never by name; a
    file there that belongs to neither the gateway's user nor root is
    refused, as a secret file is (L{openclaw.settings.permissions.check_private_file}):
    its owner could have put it there, and a database's consumers' keys
    work.

    @param euid: the gateway's user id (default: this process's).
    @raise NotARegularFile: one of them is a link, a directory, a FIFO or a
        device (its C{filename} says which).
    @raise UnusableDatabaseFile: one belongs to another user.
    @raise OSError: it cannot be created, opened for writing or have its
        mode set.
    """
    euid = os.geteuid() if euid is None else euid
    for name in (path, *(path.with_name(path.name + suffix) for suffix in COMPANION_SUFFIXES)):
        flags = os.O_RDWR | os.O_NOFOLLOW | (os.O_CREAT if name == path else 0)
        try:
            fd = open_regular_file(name, flags)
        except FileNotFoundError:
            continue
        except NotARegularFile as e:
            e.filename = str(name)
            raise
        try:
            owner = os.fstat(fd).st_uid
            if owner not in (euid, 0):
                raise UnusableDatabaseFile(
                    f"the consumers' database {str(path)!r} cannot be used ({str(name)!r} belongs to uid {owner}, "
                    f"{neither_user_nor_root(euid)}, so that user could have put it there): "
                    f"move it aside, or if it is yours, chown {euid} {str(name)!r}"
                )
            try:
                os.fchmod(fd, 0o600)
            except OSError as e:
                e.filename = str(name)
                raise
        finally:
            os.close(fd)


#: The columns of a consumer's row, in L{_consumer_values}' order.
_CONSUMER_FIELDS = ("name", "budget_usd", "budget_period", "rpm", "tpm", "models", "expires_at", "created_at")
_CONSUMER_COLUMNS = ", ".join(_CONSUMER_FIELDS)


def _consumer(row: Sequence[Any]) -> Consumer:
    """
    A consumer from its row's L{_CONSUMER_COLUMNS}.
    """
    return Consumer(
        name=row[0],
        budget_usd=row[1],
        budget_period=row[2],
        rpm=row[3],
        tpm=row[4],
        models=tuple(orjson.loads(row[5])),
        expires_at=row[6],
        created_at=row[7],
    )


def _consumer_values(consumer: Consumer) -> tuple[Any, ...]:
    return (
        consumer.name,
        consumer.budget_usd,
        consumer.budget_period,
        consumer.rpm,
        consumer.tpm,
        orjson.dumps(list(consumer.models)).decode(),
        consumer.expires_at,
        consumer.created_at,
    )


__all__ = [
    "COMMAND_LOCK_TIMEOUT_MS",
    "COMMAND_SECONDS",
    "COMMAND_STATEMENT_TIMEOUT_MS",
    "DATABASE_FILE_LOST",
    "DATABASE_RESCUED",
    "GROUPS",
    "MIGRATIONS",
    "POSTGRES_DEFAULTS",
    "CommandTimedOut",
    "ConsumerExists",
    "ConsumerStore",
    "DatabaseFileLost",
    "NewerSchema",
    "PooledConnection",
    "Retrying",
    "RowIds",
    "Snapshot",
    "StoreNotStarted",
    "UnusableDatabaseFile",
    "UsageRow",
    "database_advice",
    "database_error",
    "database_identity",
    "log_database_failure",
    "postgres_conninfo",
    "sqlite_file",
    "sqlite_file_advice",
    "unreachable",
    "unwritten_error",
]
