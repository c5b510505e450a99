"""
Whether this instance was in step with its cluster in an earlier run, and
the route it last served there: a small file in C{STATE_DIR}
(L{MEMBERSHIP_FILE}) naming the cluster (C{CLUSTER_NAME}), its store
(L{store_identity}: C{REDIS_URL}'s server and database, no credentials)
and that route, written when the instance is in step and whenever the
cluster's route changes.  It counts for the same cluster when it names the
same C{CLUSTER_NAME} and Redis database: the server is recorded for the
operator, not compared (one server has many names, C{localhost} and
C{127.0.0.1}: a name written another way would make a restarted
instance serve its own route), so an instance moved to another
Redis, empty, waits once (17 s by default) rather than never, and then
proposes the route it last served in the old one (not DEFAULT_PROVIDER's):
remove the file to start such an instance as a new one.

It holds nothing secret and decides nothing on its own: at start, an
instance that finds it (for the same cluster and store) and then finds the
store without the cluster's route or token knows the store lost them, and
waits for the instances in step to write them back rather than serve a
route and token of its own
(L{openclaw.cluster.node.ClusterNode.was_in_step}); should none write them
back (the whole cluster restarted with the store), it proposes the route
it last served rather than the configured one
(L{openclaw.cluster.node.ClusterNode.remembered_route}).  A missing,
unreadable or foreign file means "not in step before": the instance
proposes its own into an empty store at once, as a new one does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.cluster.redis import redis_database
from openclaw.files import write_atomically
from openclaw.routing import Route
from openclaw.state import read_state_file
from openclaw.writer import FileWriter, WriterStopped

MEMBERSHIP_FILE = "openclaw-cluster.json"
#: The most bytes of the file read: it holds two names, an address and a
#: route.
MAX_MEMBERSHIP_BYTES = 4096
#: Redis's port when a URL names none.
REDIS_PORT = 6379


def store_identity(redis_url: str) -> str:
    """
    The store C{redis_url} names, written one way whatever way the URL
    writes it: C{<scheme>://<host>:<port>/<database>} (the host in lower
    case, Redis's port 6379 and database 0 when it names none), or
    C{unix://<path>/<database>}; never a user or password.
    """
    parts = urlsplit(redis_url)
    database = redis_database(redis_url) or 0
    scheme = parts.scheme.lower()
    if scheme == "unix":
        return f"unix://{parts.path}/{database}"
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{parts.port or REDIS_PORT}/{database}"


@attrs.frozen
class Recorded:
    """
    What the file says of an earlier run in step with this cluster: the
    route it last served there (None: the file names none, or one of
    another shape).
    """

    route: Route | None


@attrs.frozen
class Membership:
    """
    The record, in C{STATE_DIR}, that this instance was in step with the
    cluster C{cluster_name} on the store C{store} (L{store_identity}).

    @ivar path: the file (L{MEMBERSHIP_FILE} in C{STATE_DIR}).
    @ivar writer: where L{record} writes, off the reactor thread; L{None}:
        on the calling thread (a test).
    """

    path: Path
    cluster_name: str
    store: str
    database: int = 0
    writer: FileWriter | None = None
    _log = Logger()

    @classmethod
    def in_directory(
        cls, directory: Path, cluster_name: str, redis_url: str, writer: FileWriter | None = None
    ) -> Membership:
        return cls(
            directory / MEMBERSHIP_FILE, cluster_name, store_identity(redis_url), redis_database(redis_url) or 0, writer
        )

    def read(self) -> Recorded | None:
        """
        What the file says of an earlier run in step with this cluster
        (the same name, in the same Redis database); None when it says
        nothing of one: no file, one that cannot be read or trusted
        (logged), or one of another cluster or database (logged: this
        instance will not wait for a write-back).  Blocking (a read of at most
        L{MAX_MEMBERSHIP_BYTES}), at start; never raises.
        """
        try:
            document = json.loads(read_state_file(self.path, MAX_MEMBERSHIP_BYTES))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            self._log.warn(
                "ignoring {path}: {error}; it is written again once this instance is in step with its cluster",
                path=str(self.path),
                error=str(e),
            )
            return None
        if not isinstance(document, dict):
            document = {}
        database = document.get("database")
        recorded_store = document.get("store")
        if database is None and isinstance(recorded_store, str):
            # A record of this session's first form: its store's "/N".
            tail = recorded_store.rpartition("/")[2]
            database = int(tail) if tail.isascii() and tail.isdigit() else None
        named = (document.get("cluster_name"), database)
        if named != (self.cluster_name, self.database):
            self._log.warn(
                "{path} records cluster {named} on {recorded}, not {cluster} in database {database}: this instance "
                "counts as a new one (it will not wait for the cluster's state to be written back into an empty "
                "store)",
                path=str(self.path),
                named=named[0],
                recorded=document.get("store"),
                cluster=self.cluster_name,
                database=self.database,
            )
            return None
        return Recorded(_route(document.get("route")))

    def record(self, route: Route) -> Deferred[bool]:
        """
        Write the file (atomically), naming C{route} as the one last
        served, off the reactor thread when there is a writer (a write
        asked while another waits replaces it).  Never fails: a write that
        fails is logged as a warning.

        @return: a Deferred firing with whether it was written.
        """
        text = json.dumps(
            {
                "cluster_name": self.cluster_name,
                "store": self.store,
                "database": self.database,
                "route": {"provider": route.provider_id, "model": route.model},
            }
        )
        if self.writer is None:
            try:
                write_atomically(self.path, text)
            except OSError as e:
                self._unrecorded(str(e))
                return succeed(False)
            return succeed(True)

        def failed(reason: Failure) -> bool:
            if not reason.check(WriterStopped):
                self._unrecorded(reason.getErrorMessage() or type(reason.value).__name__)
            return False

        return self.writer.write(self.path, text).addCallbacks(lambda _: True, failed)

    def _unrecorded(self, error: str) -> None:
        self._log.warn(
            "could not record in {path} that this instance is in step with its cluster ({error}): after a restart "
            "into an empty cluster store it will not wait for the instances in step to write the cluster's route "
            "and token back; fix what stops the gateway's user writing in STATE_DIR (it is tried again when the "
            "cluster's route changes, or this instance is in step again)",
            path=str(self.path),
            error=error,
        )


def _route(value: Any) -> Route | None:
    """
    The route a record's C{route} names: an object of two strings; None
    for anything else (the node checks its provider and model).
    """
    if not isinstance(value, dict):
        return None
    provider, model = value.get("provider"), value.get("model")
    if isinstance(provider, str) and isinstance(model, str):
        return Route(provider, model)
    return None
