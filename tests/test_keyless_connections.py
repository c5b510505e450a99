"""
API connections that never presented an accepted key (keyless ones) get a
smaller share per address, half of API_MAX_CONNECTIONS in all, and a
deadline (API_KEYLESS_TIMEOUT_SECONDS); a new connection is not keyless
until it had its chance to send its first head (L{KEYLESS_GRACE_SECONDS}),
so key holders' connections are never closed to make room.  Over real
sockets from many loopback addresses; L{send_calls} and L{statuses} serve
the descriptor-budget tests too.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from typing import Any

import httpx2
import openai
from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from openclaw.dataplane.connection import KEYLESS_GRACE_SECONDS
from tests.support import open_many, start_gateway, start_upstream, still_open

KEY = "gw-key-0123456789abcdef"


KIMI_KEY = "sk-kimi-SECRET-0123456789abcdef"


GEMINI_KEY = "AIza-gemini-SECRET-0123456789abcdef"


def sdk_chat(port: int, source: str) -> str:
    """
    One chat call with the openai SDK from C{source}, on one connection.
    """
    with httpx2.Client(transport=httpx2.HTTPTransport(local_address=source)) as http_client:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=10, http_client=http_client
        )
        answer = client.chat.completions.create(model="kimi-k2", messages=[{"role": "user", "content": "hi"}])
        return answer.choices[0].message.content or ""


class KeylessConnectionTests(TestCase):
    """
    API connections that never presented an accepted key get a smaller
    share per address, half of the cap in all, and a short deadline; key
    holders keep their room.
    """

    timeout = 30

    def gateway(self, **settings: Any) -> Any:
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        gateway = start_gateway(
            self, api=True, gateway_api_keys=(KEY,), providers=upstream.provider_settings(), **settings
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        return gateway

    @inlineCallbacks
    def test_keyless_flood_leaves_room_for_key_holders(self):
        """
        Eight addresses, two idle connections each, against a cap of 8:
        they used to fill it.  Once their grace is over
        (L{KEYLESS_GRACE_SECONDS}) they are keyless: one each past its
        address's keyless share is closed, and they hold at most half the
        cap, so key holders get in.
        """
        gateway = self.gateway(api_max_connections=8)
        site = gateway.service.api_site
        self.assertEqual((site.limits.max_connections_per_address, site.limits.keyless_per_address), (2, 1))

        def flood() -> list[socket.socket]:
            return [sock for n in range(2, 10) for sock in open_many(gateway.api_port, 2, f"127.0.0.{n}")]

        socks = yield deferToThread(flood)
        self.addCleanup(lambda: [sock.close() for sock in socks])
        held = yield deferToThread(still_open, socks, KEYLESS_GRACE_SECONDS + 0.5)
        self.assertEqual(held, 4)
        for _ in range(3):
            content = yield deferToThread(sdk_chat, gateway.api_port, "127.0.0.20")
            self.assertTrue(content)
        refused = site.context.refused_connections
        self.assertGreater(refused["api_keyless_connections_per_address"], 0)
        self.assertGreater(refused["api_max_connections"], 0)
        self.assertLessEqual(site.keyless_total, 4)

    @inlineCallbacks
    def test_keyless_deadline(self):
        """
        A connection that sends no request with an accepted key is closed
        at API_KEYLESS_TIMEOUT_SECONDS, however busy it keeps with keyless
        requests; one that sent a key stays.
        """
        gateway = self.gateway(api_keyless_timeout_seconds=1.0)
        port = gateway.api_port

        def keep_alive(key: str | None, seconds: float) -> tuple[list[int], float]:
            statuses: list[int] = []
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            started = time.monotonic()
            try:
                while time.monotonic() - started < seconds:
                    headers = {"Authorization": f"Bearer {key}"} if key else {}
                    connection.request("GET", "/healthz", headers=headers)
                    response = connection.getresponse()
                    response.read()
                    statuses.append(response.status)
                    time.sleep(0.2)
            except (http.client.HTTPException, OSError):
                pass
            finally:
                connection.close()
            return statuses, time.monotonic() - started

        statuses, took = yield deferToThread(keep_alive, None, 4)
        self.assertLess(took, 2.5)
        self.assertTrue(statuses)
        statuses, took = yield deferToThread(keep_alive, KEY, 2.5)
        self.assertGreaterEqual(took, 2.5)
        self.assertEqual(set(statuses), {200})
        self.assertEqual(gateway.service.api_site.keyless_total, 0)


def chat_request(model: str) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
        % (KEY.encode(), len(body), body)
    )


def send_calls(port: int, model: str, sources: list[str], pace: float = 0.01) -> list[socket.socket]:
    """
    One chat call from each of C{sources}, sent whole, not read; the
    sockets the gateway accepted (and did not close at once).
    """
    sent = []
    for source in sources:
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
            sock.sendall(chat_request(model))
            sent.append(sock)
            # Paced, so that each head is read before the next connection.
            time.sleep(pace)
        except OSError:
            pass
    return sent


def statuses(socks: list[socket.socket]) -> list[int]:
    """
    Each answer's status (0: closed or reset without one), read to the end.
    """
    found = []
    for sock in socks:
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except OSError:
            pass
        sock.close()
        found.append(int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else 0)
    return found


def connect_all(port: int, sources: list[str]) -> list[socket.socket | None]:
    """
    One connection from each of C{sources}, nothing sent (None: refused).
    """
    opened: list[socket.socket | None] = []
    for source in sources:
        try:
            opened.append(socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)))
        except OSError:
            opened.append(None)
    return opened


def call_on(socks: list[socket.socket | None], model: str) -> list[int]:
    """
    A chat call with the key on each of C{socks} (sent on all, then read);
    each answer's status, 0 for a connection reset or closed before it.
    """
    sent = []
    for sock in socks:
        try:
            if sock is None:
                raise OSError
            sock.sendall(chat_request(model))
            sent.append(sock)
        except OSError:
            sent.append(None)
    return [0 if sock is None else statuses([sock])[0] for sock in sent]


class KeyHolderNewcomerTests(TestCase):
    """
    A new connection is not keyless until it had its chance to send its
    first head (L{KEYLESS_GRACE_SECONDS}), so key holders' new connections
    are never closed to make room for anyone, while keyless ones still
    hold at most half the cap.
    """

    timeout = 60

    def gateway(self) -> Any:
        upstream = start_upstream(self, KIMI_KEY, GEMINI_KEY)
        upstream.kimi.delay = 0.2
        gateway = start_gateway(
            self, api=True, gateway_api_keys=(KEY,), providers=upstream.provider_settings(), api_max_connections=72
        )
        self.addCleanup(gateway.service.api_site.close_connections)
        site = gateway.service.api_site
        # As at nofile 256 before the pool's share: half of 72 for keyless ones.
        self.assertEqual((site.limits.max_connections_per_address, site.limits.keyless_per_address), (18, 4))
        return gateway

    @inlineCallbacks
    def test_burst_of_key_holders(self):
        """
        72 key holders from 72 addresses call at once (each sends its
        call as soon as it is connected; the gateway accepts them in
        batches, before it reads their heads): none is taken for keyless
        and closed (15 to 36 were).
        """
        gateway = self.gateway()
        sources = [f"127.0.3.{n}" for n in range(1, 73)]
        socks = yield deferToThread(send_calls, gateway.api_port, "kimi/moonshot-v1-8k", sources, 0)
        found = yield deferToThread(statuses, socks)
        found += [0] * (72 - len(socks))
        self.assertEqual(found, [200] * 72, (found, gateway.service.api_site.context.refused_connections))
        self.assertEqual(gateway.service.api_site.context.refused_connections, {})

    @inlineCallbacks
    def test_outsiders_and_key_holders(self):
        """
        100 outsider addresses with 4 idle connections each, reopening
        those the gateway closed between the key holders' connects and
        their first heads; 200 connections of a key holder from one
        address, 18 at a time: every call is answered, and the outsiders'
        keyless connections hold at most half the cap.
        """
        gateway = self.gateway()
        port = gateway.api_port
        site = gateway.service.api_site
        outsiders = [f"127.0.4.{n}" for n in range(1, 101) for _ in range(4)]
        held: list[socket.socket | None] = yield deferToThread(connect_all, port, outsiders)
        self.addCleanup(lambda: [sock.close() for sock in held if sock is not None])
        yield deferToThread(time.sleep, 1.5)
        self.assertLessEqual(site.keyless_total, 36)

        def reopen() -> None:
            # The outsiders reopen what was closed (up to 36 at a time).
            reopened = 0
            for index, sock in enumerate(held):
                if reopened == 36:
                    break
                if sock is None or still_open([sock], 0) == 0:
                    if sock is not None:
                        sock.close()
                    (held[index],) = connect_all(port, [outsiders[index]])
                    reopened += 1

        def key_holder() -> list[int]:
            found: list[int] = []
            while len(found) < 200:
                socks = connect_all(port, ["127.0.0.50"] * 18)
                reopen()
                found += call_on(socks, "kimi/moonshot-v1-8k")
            return found

        found = yield deferToThread(key_holder)
        self.assertEqual(found.count(200), len(found), found)
        self.assertLessEqual(site.keyless_total, 36)
