"""
A real PostgreSQL for the consumer tests: C{initdb} in a temporary
directory, C{postgres} on a free loopback port, trust authentication,
stopped and removed when the test process exits.  PostgreSQL refuses to
run as root: as root it runs as the C{postgres} system user (through
C{runuser}).  Missing binaries: the tests fail saying how to install them
(C{make test} installs them where it can); they never skip.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import psycopg
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.consumers.store import postgres_conninfo
from tests.redis_server import free_port


def _bin_dir() -> Path:
    # The versioned directory holds every tool (pg_isready, createdb);
    # PATH may only link some of them.
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    found = shutil.which("initdb")
    if not candidates and found:
        return Path(found).resolve().parent
    if not candidates:
        raise RuntimeError(
            "PostgreSQL is not installed: run `apt-get install -y postgresql` (as root); "
            "make test installs it when it can"
        )
    return Path(candidates[0]).parent


class PostgresServer:
    def __init__(self) -> None:
        self.bin = _bin_dir()
        self.port = free_port()
        self.directory = tempfile.mkdtemp(prefix="openclaw-pg-")
        self.data = os.path.join(self.directory, "data")
        self.running = False
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        subprocess.run(
            [*self._as, str(self.bin / "initdb"), "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.directory} "
            "-c fsync=off -c max_connections=50"
        )
        subprocess.run(
            [*self._as, str(self.bin / "pg_ctl"), "start", "-w", "-t", "30", "-D", self.data, "-o", options,
             "-l", os.path.join(self.directory, "log")],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        self.running = True

    def stop(self) -> None:
        if self.running:
            subprocess.run(
                [*self._as, str(self.bin / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", self.data],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            self.running = False
        shutil.rmtree(self.directory, ignore_errors=True)


_server: PostgresServer | None = None
_databases = 0


def postgres_database() -> str:
    """
    The URL of a fresh database on the one server this test process runs
    (started on first use, stopped at exit).
    """
    global _server, _databases
    if _server is None:
        _server = PostgresServer()
        atexit.register(_server.stop)
        _server.start()
    _databases += 1
    name = f"openclaw_{os.getpid()}_{_databases}"
    with socket.create_connection(("127.0.0.1", _server.port), timeout=5):
        pass
    subprocess.run(
        [str(_server.bin / "createdb"), "-h", "127.0.0.1", "-p", str(_server.port), "-U", "postgres", name],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return f"postgresql://postgres@127.0.0.1:{_server.port}/{name}"


class Locker:
    """
    Another session that holds C{tables} locked (C{ACCESS EXCLUSIVE}, as a
    migration or a maintenance job would) until L{release}.
    """

    def __init__(self, testcase: TestCase, database: str) -> None:
        self.testcase = testcase
        self.database = database
        self.connection: psycopg.Connection[Any] | None = None

    @inlineCallbacks
    def lock(self, *tables: str) -> Any:
        connection = self.connection = yield deferToThread(psycopg.connect, postgres_conninfo(self.database))
        self.testcase.addCleanup(self.release)
        yield deferToThread(connection.execute, f"LOCK TABLE {', '.join(tables)} IN ACCESS EXCLUSIVE MODE")

    def release(self) -> Deferred[None]:
        connection, self.connection = self.connection, None
        if connection is None:
            return Deferred.fromCoroutine(_nothing())

        def end() -> None:
            connection.rollback()
            connection.close()

        return deferToThread(end)


async def _nothing() -> None:
    return None


async def _nothing() -> None:
    return None
