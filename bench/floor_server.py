"""
The floor of this stack: a bare Autobahn server on Twisted that answers every
message with one fixed reply, nothing else.  The gateway cannot be faster
than this; bench/control_plane.py measures how close it comes.

    python bench/floor_server.py PORT
"""

import sys

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet import reactor

REPLY = b'{"ok":true,"cmd":"ping","result":{"pong":true,"ts":1764038400000}}'


class Floor(WebSocketServerProtocol):
    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.sendMessage(REPLY)


def main() -> None:
    factory = WebSocketServerFactory()
    factory.protocol = Floor
    reactor.listenTCP(int(sys.argv[1]), factory, interface="127.0.0.1")
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
