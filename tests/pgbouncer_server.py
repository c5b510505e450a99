"""
A real PgBouncer for the pooler tests, in transaction mode, on a free
loopback port in a temporary directory, in front of the test PostgreSQL
(trust authentication, as that server's).  PgBouncer refuses to run as
root: as root it runs as the C{postgres} system user.  Missing binary:
L{pgbouncer_path} is None and the tests skip, saying how to install it
(C{make test} installs it where it can).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from tests.redis_server import free_port

INSTALL = "PgBouncer is not installed: run `apt-get install -y pgbouncer` (as root); make test installs it when it can"


def pgbouncer_path() -> str | None:
    # Debian installs it in /usr/sbin, not on a non-root user's PATH.
    return shutil.which("pgbouncer") or next(
        (path for path in ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer") if os.access(path, os.X_OK)), None
    )


class PgBouncer:
    def __init__(self, database_port: int, pool_mode: str = "transaction") -> None:
        binary = pgbouncer_path()
        if binary is None:
            raise RuntimeError(INSTALL)
        self.binary = binary
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix="openclaw-pgbouncer-"))
        self.log = self.directory / "pgbouncer.log"
        (self.directory / "users.txt").write_text('"postgres" ""\n')
        (self.directory / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={database_port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.directory / 'users.txt'}\n"
            f"pool_mode = {pool_mode}\n"
            f"logfile = {self.log}\n"
        )
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            for path in (self.directory, *self.directory.iterdir()):
                shutil.chown(path, "postgres", "postgres")
        self.process: subprocess.Popen[bytes] | None = None

    def url(self, database: str) -> str:
        """
        C{database}'s URL (C{postgresql://...}), with its host and port
        replaced by the pooler's.
        """
        name = database.rpartition("/")[2]
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.binary, str(self.directory / "pgbouncer.ini")],
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start: {self.said()}") from None
                time.sleep(0.1)

    def said(self) -> str:
        try:
            return self.log.read_text()
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)
