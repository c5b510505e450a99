"""
The consumers' SQLite database (openclaw.db, its -wal and -shm files) is
readable by its owner only: it holds key hashes and usage.
"""

from __future__ import annotations

import stat
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.threads import deferToThread

from tests.test_consumers import GatewayCase
from tests.test_dataplane import HELLO


class DatabaseFileTests(GatewayCase):
    @inlineCallbacks
    def test_database_is_private(self) -> Any:
        """
        openclaw.db and its -wal and -shm files are readable by their owner
        only (they hold key hashes and usage).
        """
        gateway, client = yield self.gateway()
        created = yield self.command(gateway, client, "consumer_create", {"name": "p"})
        yield deferToThread(
            self.sdk(gateway, created["key"]).chat.completions.create, model="kimi/moonshot-v1-8k", messages=HELLO
        )
        yield gateway.service.consumers.flush()
        database = gateway.service.settings.state_dir / "openclaw.db"
        files = [database, *(database.with_name(database.name + tail) for tail in ("-wal", "-shm"))]
        self.assertTrue(all(f.exists() for f in files), files)
        for f in files:
            self.assertEqual(stat.S_IMODE(f.stat().st_mode), 0o600, f)
