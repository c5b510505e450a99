"""
L{openclaw.cluster.workers.reserve} on real sockets of a free loopback
port: the reservation of a C{--workers} gateway's ports, refused while
another gateway listens there; the settings a worker takes from its
parent through a pipe (L{settings_bytes}, L{read_settings}).  (Two real
C{twistd --workers 2}: L{tests.test_cluster.Workers}.)
"""

from __future__ import annotations

import copyreg
import errno
import io
import json
import os
import pickle
import socket
import sys
import time
from pathlib import Path
from types import MappingProxyType

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase

from openclaw import tap
from openclaw.cluster.workers import INSTALLED_AGAIN_STATUS, Reservation, read_settings, reserve, settings_bytes
from openclaw.consumers.prices import Price
from openclaw.listeners import CannotListen, Listener, check_free, lock_port
from openclaw.settings import ConfigError, Settings, load_settings
from tests.support import free_port
from tests.test_twistd import SECRET


def worker_socket(port: int) -> socket.socket:
    """
    A worker's listening socket on C{port}, bound as
    L{openclaw.cluster.workers.ReusePortEndpoint} binds it.
    """
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen()
    return sock


class ReserveTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.port = free_port()
        self.listener = Listener(f"127.0.0.1:{self.port}", "WS_CONTROL_PORT", "--port", "from the command line")

    def reserve(self) -> Reservation:
        reservation = reserve(self.listener, "127.0.0.1", self.port)
        self.addCleanup(reservation.close)
        return reservation

    def held(self, sock: socket.socket) -> socket.socket:
        self.addCleanup(sock.close)
        return sock

    def assertRefused(self) -> None:
        with self.assertRaises(CannotListen) as raised:
            self.reserve()
        self.assertEqual(
            str(raised.exception),
            f"openclaw: cannot listen on 127.0.0.1:{self.port} (WS_CONTROL_PORT, from the command line): another "
            f"gateway (or another program) is already listening on 127.0.0.1:{self.port}; stop it, or choose "
            "another port with --port",
        )

    def test_refused_beside_another_gateways_workers(self) -> None:
        """
        A second C{--workers} gateway (same user, another pidfile) on the
        ports of one running: refused, where its reservation (then its
        workers) would join the first one's C{SO_REUSEPORT} group and the
        kernel spread connections over both gateways.
        """
        self.reserve()
        self.held(worker_socket(self.port))
        self.held(worker_socket(self.port))
        self.assertRefused()

    def test_refused_beside_another_gateway_starting(self) -> None:
        """
        A second C{--workers} gateway on the ports of one none of whose
        workers listens yet (both started within a second, or all of the
        first one's workers being started again): refused by the first
        one's lock of the port, where nothing listens for the plain socket
        to see; at any address of the host (C{::} beside C{127.0.0.1}, and
        C{127.1} or C{localhost} for C{127.0.0.1}: re-attack and review
        s30).  Once the first one has ended, the port is free again.
        """
        first = reserve(self.listener, "127.0.0.1", self.port)
        for interface in ("127.0.0.1", "127.1", "localhost", "::", "0.0.0.0", "127.0.0.2"):
            with self.assertRaises(CannotListen, msg=interface) as raised:
                reserve(self.listener, interface, self.port)
            self.assertEqual(
                str(raised.exception),
                f"openclaw: cannot listen on 127.0.0.1:{self.port} (WS_CONTROL_PORT, from the command line): "
                f"another openclaw gateway holds port {self.port} on this host (starting, listening at another "
                "of its addresses, or stopping: one holds its ports until its calls have drained, "
                "SHUTDOWN_GRACE_SECONDS at most); stop it or wait for it to end, or choose another port with --port",
            )
        # Another port is another lock.
        port = free_port()
        reserve(Listener(f"127.0.0.1:{port}", "API_PORT", "--api-port", "default"), "127.0.0.1", port).close()
        first.close()
        self.reserve()

    def test_single_gateway_refused_while_workers_start(self) -> None:
        """
        A single-process gateway's check of its port (L{check_free}) sees
        a --workers gateway none of whose workers listens yet: refused,
        where it took the port and the workers could not bind it (review
        s30); and the other way round, the single one holding the port's
        lock from its check on, until its listener is up and after.
        """
        reservation = self.reserve()
        check_free(self.listener, "127.0.0.1", self.port)
        with self.assertRaises(CannotListen) as raised:
            lock_port(self.listener, self.port)
        self.assertIn("another openclaw gateway holds port", str(raised.exception))
        reservation.close()
        lock = lock_port(self.listener, self.port)
        self.assertIsNotNone(lock)
        with self.assertRaises(CannotListen) as raised:
            reserve(self.listener, "::", self.port)
        self.assertIn("another openclaw gateway holds port", str(raised.exception))
        assert lock is not None
        lock.close()
        self.reserve()

    def test_refused_beside_a_single_gateway(self) -> None:
        """
        A single-process gateway (Twisted's listener: C{SO_REUSEADDR}, no
        C{SO_REUSEPORT}) or another program listening there: refused.
        """
        single = self.held(socket.socket())
        single.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        single.bind(("127.0.0.1", self.port))
        single.listen()
        self.assertRefused()

    def test_own_workers_listen_and_listen_again(self) -> None:
        """
        The reservation taken, its workers listen beside it; one that ended
        is started again and listens again (the reservation, which never
        listens, is no obstacle to it); a single-process gateway's
        listener on the port is refused meanwhile, as it always was.
        """
        self.reserve()
        self.held(worker_socket(self.port))
        ended = worker_socket(self.port)
        ended.close()
        self.held(worker_socket(self.port))
        with socket.socket() as single:
            single.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            with self.assertRaises(OSError) as raised:
                single.bind(("127.0.0.1", self.port))
                single.listen()
        self.assertEqual(raised.exception.errno, errno.EADDRINUSE)

    def test_time_wait_of_an_earlier_run_is_no_obstacle(self) -> None:
        """
        A connection the gateway closed first, in C{TIME_WAIT} on the port
        for a minute after its run ended (a restart): the port is free.
        """
        for reuse_port in (True, False):  # a --workers run's, a single one's
            listening = socket.socket()
            listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listening.bind(("127.0.0.1", self.port))
            listening.listen()
            client = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            accepted, _ = listening.accept()
            accepted.close()
            client.settimeout(5)
            self.assertEqual(client.recv(1), b"")
            client.close()
            listening.close()
            # The server's side of it is in TIME_WAIT: a socket without
            # SO_REUSEADDR may not bind the port (at most a moment after
            # the client's FIN).
            deadline = time.monotonic() + 5
            while True:
                with socket.socket() as plain:
                    try:
                        plain.bind(("127.0.0.1", self.port))
                    except OSError as e:
                        self.assertEqual(e.errno, errno.EADDRINUSE)
                        break
                self.assertLess(time.monotonic(), deadline, "no TIME_WAIT seen on the port")
                time.sleep(0.01)
            reserve(self.listener, "127.0.0.1", self.port).close()


class SettingsPipeTests(SynchronousTestCase):
    """
    A worker's settings: its parent's, pickled (L{settings_bytes}) into a
    pipe and read back from it (L{read_settings}).
    """

    def setUp(self) -> None:
        self.patch(os, "environ", {})
        self.cwd = Path(self.mktemp()).resolve()
        self.cwd.mkdir(parents=True)

    def settings(self) -> Settings:
        """
        Settings as C{twistd openclaw --workers 2} reads them: secrets, keys,
        a price file, networks, their sources and a state directory made.
        """
        secret = self.cwd / "jwt.secret"
        secret.write_text("j" * 40)
        secret.chmod(0o600)
        prices = self.cwd / "prices.json"
        prices.write_text(json.dumps({"models": {"kimi/k2": {"prompt": 1.5, "completion": 6}}}))
        env = self.cwd / "openclaw.env"
        env.write_text(
            f"JWT_SECRET_FILE={secret}\nPRICES_FILE={prices}\nKIMI_API_KEY=key-one\nGEMINI_API_KEYS=g-1,g-2\n"
            "REDIS_URL=redis://:pw@127.0.0.1:6379/0\nTRUSTED_CLIENTS=127.0.0.1,10.0.0.0/8\nFALLBACK=gemini\n"
            "GATEWAY_API_KEYS=sk-aaaaaaaaaaaaaaaa,sk-bbbbbbbbbbbbbbbb\n"
        )
        env.chmod(0o600)
        return load_settings(
            {"WORKERS": "2", "STATE_DIR": str(self.cwd / "state" / "new")}, env_file=str(env), cwd=self.cwd
        )

    def through_pipe(self, data: bytes) -> Settings:
        reading, writing = os.pipe()
        with open(writing, "wb") as pipe:
            pipe.write(data)
        return read_settings(reading)

    def test_round_trip(self) -> None:
        """
        The settings read back from the pipe are equal to the parent's (C{==}),
        the fields left out of C{==} (C{sources}, C{made_directories}) too,
        and read-only as the parent's are; the pipe is closed once read.
        """
        settings = self.settings()
        self.assertEqual(settings.price_overrides, {"kimi/k2": Price(1.5, 6.0)})
        self.assertNotEqual(settings.made_directories, ())
        reading, writing = os.pipe()
        with open(writing, "wb") as pipe:
            pipe.write(settings_bytes(settings))
        read = read_settings(reading)
        self.assertEqual(read, settings)
        self.assertEqual(read.jwt_secret, b"j" * 40)
        self.assertEqual(read.providers["kimi"].api_key, "key-one")
        self.assertEqual(read.redis_url, settings.redis_url)
        self.assertEqual(dict(read.sources), dict(settings.sources))
        self.assertEqual(read.source("PRICES_FILE"), settings.source("PRICES_FILE"))
        self.assertEqual(read.made_directories, settings.made_directories)
        for mapping in (read.providers, read.price_overrides, read.sources):
            self.assertIsInstance(mapping, MappingProxyType)
        with self.assertRaises(OSError):
            os.fstat(reading)

    def test_no_global_registration(self) -> None:
        """
        Only this pickler pickles a C{MappingProxyType}: pickle elsewhere in
        the process still refuses one (no C{copyreg} registration).
        """
        settings_bytes(Settings())
        self.assertNotIn(MappingProxyType, copyreg.dispatch_table)
        with self.assertRaises(TypeError):
            pickle.dumps(MappingProxyType({}))

    def test_cut_short(self) -> None:
        """
        Settings cut short (the parent ended while writing them), or a
        pipe that holds none: one line saying so.
        """
        data = settings_bytes(Settings())
        for written in (data[: len(data) // 2], b"", pickle.dumps({"port": 1})):
            with self.assertRaises(ConfigError) as caught:
                self.through_pipe(written)
            self.assertIn("its parent ended while writing them, or --worker is set by --workers", str(caught.exception))

    def test_another_installation(self) -> None:
        """
        Settings written by another installation of openclaw (upgraded in
        place while the twistd process ran: another version, or settings
        of another shape) are refused with one line saying to restart it,
        not unpickled into settings that lack fields (review s29).
        """
        data = settings_bytes(Settings())
        header, _, pickled = data.partition(b"\n")
        mark, version, fingerprint = header.decode().split(" ")
        for written in (
            f"{mark} 0.0.1 {fingerprint}\n".encode() + pickled,
            f"{mark} {version} 0123456789abcdef\n".encode() + pickled,
        ):
            with self.assertRaises(ConfigError) as caught:
                self.through_pipe(written)
            self.assertIn(
                "openclaw was installed again since the twistd process started; restart it", str(caught.exception)
            )

    def test_another_installation_ends_the_worker_with_its_status(self) -> None:
        """
        A worker given another installation's settings ends with
        L{INSTALLED_AGAIN_STATUS}, which its parent stops the gateway on,
        its line saying why.
        """
        data = settings_bytes(Settings())
        header, _, pickled = data.partition(b"\n")
        mark, _, fingerprint = header.decode().split(" ")
        reading, writing = os.pipe()
        with open(writing, "wb") as pipe:
            pipe.write(f"{mark} 0.0.1 {fingerprint}\n".encode() + pickled)
        self.patch(tap, "read_settings", lambda: read_settings(reading))
        options = tap.Options()
        options.parseOptions(["--worker", "1", "--supervisor", "1"])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            tap.makeService(options, reactor, stdout=io.StringIO())
        self.assertEqual(raised.exception.code, INSTALLED_AGAIN_STATUS)
        self.assertIn("openclaw was installed again since the twistd process started", stderr.getvalue())

    def test_not_a_pipe(self) -> None:
        """
        C{--worker} by hand with another file open on the descriptor: it
        is not read (a terminal would wait for ever), one line says why.
        """
        path = Path(self.mktemp())
        path.write_bytes(settings_bytes(Settings()))
        fd = os.open(path, os.O_RDONLY)
        with self.assertRaises(ConfigError) as caught:
            read_settings(fd)
        self.assertEqual(
            str(caught.exception),
            f"a worker reads its settings from its parent on descriptor {fd}, which is not a pipe; "
            "--worker is set by --workers, not by hand",
        )
        with self.assertRaises(OSError):
            os.fstat(fd)

    def test_no_pipe(self) -> None:
        """
        C{--worker} by hand (no pipe from a parent on the descriptor): one
        line saying it is set by C{--workers}.
        """
        reading, writing = os.pipe()
        os.close(reading)
        os.close(writing)
        with self.assertRaises(ConfigError) as caught:
            read_settings(reading)
        self.assertEqual(
            str(caught.exception),
            f"a worker reads its settings from its parent on descriptor {reading}, which cannot be read "
            "(Bad file descriptor); --worker is set by --workers, not by hand",
        )


class WorkerStartTests(SynchronousTestCase):
    def test_refusal_leaves_the_parents_state_directory(self) -> None:
        """
        A worker refused at its start (here a C{--supervisor} that is not a
        process id)
        leaves the state directory its parent made while reading the
        settings (L{Settings.made_directories}): its parent and siblings
        use it; only the parent's own refusal takes it back.
        """
        state = Path(self.mktemp()).resolve() / "state"
        state.mkdir(parents=True)
        settings = Settings(
            jwt_secret=SECRET.encode(),
            jwt_secret_is_ephemeral=False,
            redis_url="redis://127.0.0.1:1/0",
            workers=2,
            state_dir=state,
            made_directories=(state,),
        )
        reading, writing = os.pipe()
        with open(writing, "wb") as pipe:
            pipe.write(settings_bytes(settings))
        self.patch(tap, "read_settings", lambda: read_settings(reading))
        options = tap.Options()
        options.parseOptions(["--worker", "1", "--supervisor", "one"])
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as raised:
            tap.makeService(options, reactor, stdout=io.StringIO())
        self.assertEqual(raised.exception.code, 2)
        self.assertIn("--worker is set by --workers, not by hand", stderr.getvalue())
        self.assertTrue(state.is_dir())
