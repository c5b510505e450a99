"""
What an operator installs and runs: C{make run} without the test extras,
and the systemd unit (C{systemd-analyze verify}, with every path it names
created as its install comments say).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from openclaw.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "openclaw.service"


def make_dry_run(target: str, *variables: str) -> str:
    if shutil.which("make") is None:
        raise SkipTest("make is not installed")
    return subprocess.run(
        ["make", "-n", "-B", target, *variables], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout


class MakefileTests(SynchronousTestCase):
    def test_run_installs_no_test_extras(self) -> None:
        installs = [line for line in make_dry_run("run").splitlines() if "pip install" in line]
        # What running needs, HTTP/2 on a TLS listener included: no test extras.
        self.assertIn(".venv/bin/python -m pip install --quiet -c constraints.txt '.[http2]'", installs)
        self.assertNotIn("[test]", "\n".join(installs))

    def test_test_installs_test_extras(self) -> None:
        # The versions the suite last passed with (constraints.txt).
        self.assertIn("pip install --quiet -c constraints.txt '.[test]'", make_dry_run("test"))

    def test_runners_run_in_two_workers(self) -> None:
        """
        make test runs the suite once, under pytest, in two worker
        processes (the 15 minutes CI allows on two cores); make trial runs
        it under trial, after setting up the same servers; TEST_JOBS=1 runs
        each in one.
        """
        lines = [line.strip() for line in make_dry_run("test", "PYTEST_ARGS=").splitlines()]
        self.assertIn(".venv/bin/python -m pytest -n 2", lines)
        self.assertNotIn("twisted.trial", "\n".join(lines))
        trial = [line.strip() for line in make_dry_run("trial").splitlines()]
        self.assertIn(".venv/bin/python -m twisted.trial -j 2 tests", trial)
        self.assertTrue(any("redis-server" in line for line in trial), trial)
        self.assertIn(".venv/bin/python -m pytest -n 1", make_dry_run("test", "TEST_JOBS=1", "PYTEST_ARGS="))
        self.assertIn(".venv/bin/python -m twisted.trial -j 1 tests", make_dry_run("trial", "TEST_JOBS=1"))


class SystemdUnitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.text = UNIT.read_text()
        self.directives = [line for line in self.text.splitlines() if line and not line.startswith("#")]
        self.comments = "\n".join(line for line in self.text.splitlines() if line.startswith("#"))

    def directive(self, name: str) -> list[str]:
        return [line.split("=", 1)[1] for line in self.directives if line.startswith(name + "=")]

    def test_settings(self) -> None:
        self.assertEqual(self.directive("EnvironmentFile"), ["-/etc/openclaw/openclaw.env"])
        (limit,) = self.directive("LimitNOFILE")
        self.assertGreaterEqual(int(limit), 16384)

    def test_portable_and_timely(self) -> None:
        """
        The credential's path is spelled out (systemd's C{%d} needs 251 or
        later; Ubuntu 22.04 has 249: host trial s21), and systemd waits
        for a stop longer than its default grace (else SIGKILL).
        """
        (secret_file,) = [e for e in self.directive("Environment") if e.startswith("JWT_SECRET_FILE=")]
        self.assertEqual(secret_file, "JWT_SECRET_FILE=/run/credentials/openclaw.service/jwt_secret")
        (timeout,) = self.directive("TimeoutStopSec")
        self.assertGreaterEqual(int(timeout), Settings().shutdown_grace_seconds + 15)

    def test_install_comments_create_every_path(self) -> None:
        """
        Every file the unit reads is created by a command of its install
        comments; the directories it names are systemd's own
        (RuntimeDirectory=, StateDirectory=) or created there too.
        """
        named = set(re.findall(r"(?<![\w%])/(?:etc|opt|var|run|usr)/[\w./-]+", "\n".join(self.directives)))
        self.assertTrue(named)
        made_by_systemd = {"/run/openclaw", "/var/lib/openclaw", "/run/credentials/openclaw.service"}
        for path in named:
            if any(path == d or path.startswith(d + "/") for d in made_by_systemd):
                continue
            self.assertIn(path, self.comments, f"{path} is named by the unit but not created by its install comments")
        self.assertIn("StateDirectory=openclaw", self.directives)
        self.assertIn("RuntimeDirectory=openclaw", self.directives)

    def test_systemd_analyze_verify(self) -> None:
        analyzer = shutil.which("systemd-analyze")
        if analyzer is None:
            raise SkipTest("systemd-analyze is not installed (Debian: apt-get install systemd)")
        root = Path(self.mktemp()).resolve()
        units = Path("/usr/lib/systemd/system")
        if not units.is_dir():
            raise SkipTest("no systemd unit directory to verify against")
        # The paths the install comments create, in a root of their own.
        twistd = root / "opt/openclaw/bin/twistd"
        twistd.parent.mkdir(parents=True)
        twistd.write_text("#!/bin/sh\n")
        twistd.chmod(0o755)
        (root / "etc/openclaw").mkdir(parents=True)
        (root / "etc/openclaw/jwt_secret").write_text("x" * 48)
        (root / "etc/openclaw/jwt_secret").chmod(0o600)
        shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
        installed = root / "etc/systemd/system/openclaw.service"
        installed.parent.mkdir(parents=True)
        shutil.copy(UNIT, installed)
        result = subprocess.run(
            [analyzer, "verify", "--man=no", f"--root={root}", str(installed)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual((result.returncode, result.stderr, result.stdout), (0, "", ""))
