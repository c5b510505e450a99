"""
The control plane's admission policy (L{openclaw.control.admission.Admission})
as a plain object, without a reactor or a socket: capacity and the slots
kept for operators, handshake budgets, unauthenticated connections per
client, origins, the allowlist, trusted proxies and the lockout.  The same
over real sockets: tests.test_allowlist_proxies.
"""

from __future__ import annotations

import ipaddress

from autobahn.websocket.types import ConnectionDeny
from twisted.trial.unittest import SynchronousTestCase

from openclaw.control.admission import Admission, LockedOut, Refused
from openclaw.control.closecodes import (
    PROXY_CLIENT_UNREADABLE_REASON,
    PROXY_NAMED_NO_CLIENT_REASON,
    UNTRUSTED_PEER_REASON,
)
from openclaw.control.lockout import AuthLockout
from openclaw.listeners import HANDSHAKE_HEADROOM
from openclaw.settings import Settings

OPERATOR = "192.0.2.10"
PROXY = "192.0.2.20"
STRANGER = "198.51.100.7"


class AdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.now = 1000.0
        self.settings = Settings(
            trusted_clients=(ipaddress.ip_network("192.0.2.0/28"),),
            trusted_proxies=(ipaddress.ip_network(f"{PROXY}/32"),),
            allowed_origins=("https://console.example",),
            max_connections=64,
            auth_lockout_failures=2,
            auth_lockout_window_seconds=60.0,
            auth_lockout_seconds=30.0,
        )
        self.lockout = AuthLockout.from_settings(self.settings, self.clock)
        self.admission = Admission(self.settings, self.lockout, self.clock)

    def clock(self) -> float:
        return self.now

    def test_capacity(self) -> None:
        """
        At most MAX_CONNECTIONS plus the handshakes' headroom, or the
        descriptors' share when smaller; a sixteenth kept for operators.
        """
        self.assertEqual(self.admission.capacity, 64 + HANDSHAKE_HEADROOM)
        self.assertEqual(self.admission.max_connections, 64)
        small = Admission(self.settings, self.lockout, self.clock, capacity=32)
        self.assertEqual((small.capacity, small.max_connections, small.reserved), (32, 32, 2))
        self.assertEqual(Admission(self.settings, self.lockout, self.clock, capacity=0).capacity, 1)

    def test_handshake_slot(self) -> None:
        """
        A new TCP connection counts by its address's key; an outsider is
        neither allowlisted nor a trusted proxy; a UNIX socket counts
        nowhere.
        """
        slot = self.admission.handshake_slot
        self.assertEqual(slot(OPERATOR), (OPERATOR, False))
        self.assertEqual(slot(PROXY), (PROXY, False))
        self.assertEqual(slot(STRANGER), (STRANGER, True))
        self.assertEqual(slot("::ffff:198.51.100.7"), (STRANGER, True))
        self.assertEqual(slot("2001:db8::1"), ("2001:db8::/64", True))
        self.assertEqual(slot(None), (None, False))
        self.assertEqual(slot("not-an-address"), (None, True))

    def test_tcp_refusal(self) -> None:
        """
        At capacity every newcomer is dropped; in the reserve, outsiders
        and addresses already holding a slot, not an operator's first.
        """
        admission = Admission(self.settings, self.lockout, self.clock, capacity=32)
        refusal = admission.tcp_refusal
        self.assertIsNone(refusal(STRANGER, True, 29))
        self.assertEqual(refusal(STRANGER, True, 30), "reserved_for_operators")
        self.assertIsNone(refusal(OPERATOR, False, 30))
        self.assertIsNone(admission.budget.take(OPERATOR, False))
        self.assertEqual(refusal(OPERATOR, False, 30), "reserved_for_operators")
        self.assertIsNone(refusal(OPERATOR, False, 29))
        self.assertEqual(refusal("192.0.2.11", False, 32), "too_many_handshakes")

    def test_accepted(self) -> None:
        """
        An allowlisted client, with an allowed origin or none, is accepted;
        so is a peer on a UNIX socket, without an address.
        """
        self.assertIsNone(self.admission.refusal(OPERATOR, {}, 0, client=OPERATOR))
        headers = {"origin": "HTTPS://console.example/"}
        self.assertIsNone(self.admission.refusal(OPERATOR, headers, 0, client=OPERATOR))
        self.assertIsNone(self.admission.refusal(None, {}, 0, local=True))

    def test_too_many_connections(self) -> None:
        """
        At MAX_CONNECTIONS, 503: an operator too, a UNIX socket's peer too.
        """
        for host, local in ((OPERATOR, False), (None, True)):
            refused = self.admission.refusal(host, {}, 64, local=local, client=host)
            assert refused is not None
            self.assertEqual(refused.reason, "too_many_connections")
            assert isinstance(refused.answer, ConnectionDeny)
            self.assertEqual(refused.answer.code, ConnectionDeny.SERVICE_UNAVAILABLE)

    def test_origin(self) -> None:
        """
        A page's origin not in ALLOWED_ORIGINS (C{null} too) is refused
        with 403, and logged with it; a UNIX socket's peer too.
        """
        for origin in ("https://evil.example", "null"):
            for host, local in ((OPERATOR, False), (None, True)):
                refused = self.admission.refusal(host, {"origin": origin}, 0, local=local, client=host)
                assert refused is not None
                self.assertEqual((refused.reason, refused.fields), ("origin_not_allowed", {"origin": origin}))
                assert isinstance(refused.answer, ConnectionDeny)
                self.assertEqual(refused.answer.code, ConnectionDeny.FORBIDDEN)

    def test_untrusted(self) -> None:
        """
        A peer outside TRUSTED_CLIENT_IPS, or a client a trusted proxy
        named outside it, is closed with 1008, logged with that client.
        """
        self.assertEqual(
            self.admission.refusal(STRANGER, {}, 0, client=STRANGER),
            Refused("untrusted_peer", UNTRUSTED_PEER_REASON, fields={"client": STRANGER}),
        )
        headers = {"x-forwarded-for": STRANGER}
        client = self.admission.client(PROXY, headers)
        self.assertEqual(client, STRANGER)
        self.assertEqual(
            self.admission.refusal(PROXY, headers, 0, client=client),
            Refused("untrusted_peer", UNTRUSTED_PEER_REASON, fields={"client": STRANGER}),
        )
        self.assertEqual(self.admission.logged_peer(PROXY, f"{PROXY}:4711", client), (STRANGER, f"{PROXY}:4711"))
        self.assertEqual(self.admission.logged_peer(STRANGER, f"{STRANGER}:4711", STRANGER), (f"{STRANGER}:4711", None))

    def test_proxy_naming_no_client(self) -> None:
        """
        A trusted proxy whose headers name no client to believe (none, or
        forged and disagreeing) is closed with 1008, saying which; a UNIX
        socket's forwarding headers are not read.
        """
        self.assertIsNone(self.admission.client(PROXY, {}))
        self.assertEqual(
            self.admission.refusal(PROXY, {}, 0, client=None),
            Refused("proxy_named_no_client", PROXY_NAMED_NO_CLIENT_REASON),
        )
        headers = {"x-forwarded-for": OPERATOR, "forwarded": f"for={STRANGER}"}
        self.assertIsNone(self.admission.client(PROXY, headers))
        self.assertEqual(
            self.admission.refusal(PROXY, headers, 0, client=None),
            Refused("proxy_client_unreadable", PROXY_CLIENT_UNREADABLE_REASON),
        )
        self.assertIsNone(self.admission.client(None, {"x-forwarded-for": OPERATOR}, local=True))

    def test_locked_out(self) -> None:
        """
        A locked-out client is refused with 429 and the seconds it has to
        wait, not logged again (its lockout was); once it ends, accepted.
        """
        self.assertIsNone(self.lockout.record_failure(OPERATOR))
        self.assertIsNotNone(self.lockout.record_failure(OPERATOR))
        self.assertTrue(self.admission.locked_out(OPERATOR))
        self.now += 10.5
        refused = self.admission.refusal(OPERATOR, {}, 0, client=OPERATOR)
        assert refused is not None
        self.assertEqual((refused.reason, refused.log), ("locked_out", False))
        assert isinstance(refused.answer, LockedOut)
        self.assertEqual((refused.answer.code, refused.answer.retry_after), (429, 20))
        self.now += 20
        self.assertFalse(self.admission.locked_out(OPERATOR))
        self.assertIsNone(self.admission.refusal(OPERATOR, {}, 0, client=OPERATOR))

    def test_unauthenticated_per_client(self) -> None:
        """
        One client may hold a quarter of MAX_CONNECTIONS not authenticated
        yet; one given back makes room; a UNIX socket's peer counts
        nowhere.
        """
        for _ in range(16):
            self.assertIsNone(self.admission.take_unauthenticated(OPERATOR))
        refused = self.admission.take_unauthenticated(OPERATOR)
        assert refused is not None
        self.assertEqual(refused.reason, "too_many_unauthenticated")
        assert isinstance(refused.answer, ConnectionDeny)
        self.assertEqual(refused.answer.code, ConnectionDeny.SERVICE_UNAVAILABLE)
        self.assertIsNone(self.admission.take_unauthenticated("192.0.2.11"))
        self.admission.release_unauthenticated(OPERATOR)
        self.assertIsNone(self.admission.take_unauthenticated(OPERATOR))
        for _ in range(20):
            self.assertIsNone(self.admission.take_unauthenticated(None))
