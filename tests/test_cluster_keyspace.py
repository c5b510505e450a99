"""
The cluster store's heartbeat, reloads and writes never scan Redis's
keyspace, and keys of the earlier layout are ignored: C{twistd openclaw}
instances on a real C{redis-server} holding 200k unrelated keys.
L{redis_command} (RESP, blocking) serves the other cluster test modules
too.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.test_cluster import ClusterCase, sleep


def redis_command(port: int, *args: str) -> Any:
    """
    One command to Redis on C{port} (RESP, blocking): its reply, decoded
    enough for these tests.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        parts = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        sock.sendall(b"".join(parts))
        reader = sock.makefile("rb")
        return _reply(reader)


def _reply(reader: Any) -> Any:
    line = reader.readline().rstrip(b"\r\n")
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        if int(rest) < 0:
            return None
        data = reader.read(int(rest) + 2)
        return data[:-2].decode(errors="replace")
    if kind == b"*":
        return [_reply(reader) for _ in range(max(0, int(rest)))]
    raise RuntimeError(f"unexpected reply {line!r}")


POPULATE = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('SET', 'unrelated:' .. i, 'x')
end
return redis.call('DBSIZE')
"""


class NoScan(ClusterCase):
    @inlineCallbacks
    def test_heartbeat_and_reload_ignore_unrelated_keys(self) -> None:
        """
        With 200k unrelated keys in the database, no script of the
        gateway's (heartbeat, reload of rests and lockouts, writes) takes
        more than 5 ms: none scans the keyspace.  The keys of the earlier
        layout are ignored.
        """
        port = self.redis.port
        size = yield deferToThread(redis_command, port, "EVAL", POPULATE, "0", "200000")
        self.assertGreaterEqual(size, 200000)
        yield deferToThread(redis_command, port, "CONFIG", "SET", "slowlog-log-slower-than", "5000")
        yield deferToThread(redis_command, port, "SLOWLOG", "RESET")
        # Keys of the earlier layout (a rolling upgrade) are ignored.
        for key in ("openclaw:instance:old", "openclaw:rest:kimi:0123", "openclaw:lockout:192.0.2.1"):
            yield deferToThread(redis_command, port, "SET", key, "1", "EX", "60")
        a = self.spawn()
        token = yield a.token
        b = self.spawn()
        yield b.token
        client = yield self.client(b.port)
        answer = yield client.command(token, "rotate_token")
        self.assertTrue(answer["ok"], answer)
        # A failed authentication is counted in Redis too.
        answer = yield client.command("forged", "ping")
        self.assertFalse(answer["ok"], answer)
        # Both have beaten and reloaded rests and lockouts by now.
        yield sleep(1)
        slow = yield deferToThread(redis_command, port, "SLOWLOG", "GET", "100")
        self.assertEqual([entry[3] for entry in slow], [])
        alive = yield deferToThread(redis_command, port, "ZCARD", "openclaw:instances")
        self.assertEqual(alive, 2)
