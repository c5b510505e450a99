"""
L{openclaw.cluster.workers.reserve} on real sockets of a free loopback
port: the reservation of a C{--workers} gateway's ports, refused while
another gateway listens there.  (Two real C{twistd --workers 2}:
L{tests.test_cluster.Workers}.)
"""

from __future__ import annotations

import errno
import socket
import time

from twisted.trial.unittest import SynchronousTestCase

from openclaw.cluster.workers import reserve
from openclaw.listeners import CannotListen, Listener
from tests.support import free_port


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

    def reserve(self) -> socket.socket:
        sock = reserve(self.listener, "127.0.0.1", self.port)
        self.addCleanup(sock.close)
        return sock

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
            sock = reserve(self.listener, "127.0.0.1", self.port)
            sock.close()
