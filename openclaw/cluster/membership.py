"""
Whether this instance was in step with its cluster in an earlier run: a
small file in C{STATE_DIR} (L{MEMBERSHIP_FILE}) naming the cluster
(C{CLUSTER_NAME}) and its store (C{REDIS_URL} without its password),
written the first time in a run the instance is in step.

It holds nothing secret and decides nothing on its own: at start, an
instance that finds it (for the same cluster and store) and then finds the
store empty knows the store lost the cluster's state, and waits for the
instances in step to write it back rather than serve a route and token of
its own (L{openclaw.cluster.node.ClusterNode.was_in_step}).  A missing,
unreadable or foreign file means "not in step before": the instance
proposes its own into an empty store at once, as a new one does.
"""

from __future__ import annotations

import json
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.files import write_atomically
from openclaw.state import read_state_file
from openclaw.writer import FileWriter, WriterStopped

MEMBERSHIP_FILE = "openclaw-cluster.json"
#: The most bytes of the file read: it holds a name and an address.
MAX_MEMBERSHIP_BYTES = 4096


@attrs.frozen
class Membership:
    """
    The record, in C{STATE_DIR}, that this instance was in step with the
    cluster C{cluster_name} on the store at C{store} (an address without
    password: L{openclaw.urls.masked_url}).

    @ivar path: the file (L{MEMBERSHIP_FILE} in C{STATE_DIR}).
    @ivar writer: where L{record} writes, off the reactor thread; L{None}:
        on the calling thread (a test).
    """

    path: Path
    cluster_name: str
    store: str
    writer: FileWriter | None = None
    _log = Logger()

    @classmethod
    def in_directory(
        cls, directory: Path, cluster_name: str, store: str, writer: FileWriter | None = None
    ) -> Membership:
        return cls(directory / MEMBERSHIP_FILE, cluster_name, store, writer)

    def _document(self) -> dict[str, str]:
        return {"cluster_name": self.cluster_name, "store": self.store}

    def held(self) -> bool:
        """
        Whether the file says this instance was in step with this cluster
        (the same name, on the same store) in an earlier run.  Blocking
        (a read of at most L{MAX_MEMBERSHIP_BYTES}), at start; never
        raises: a file that cannot be read or trusted is "no" (logged).
        """
        try:
            document = json.loads(read_state_file(self.path, MAX_MEMBERSHIP_BYTES))
        except FileNotFoundError:
            return False
        except (OSError, ValueError, RecursionError) as e:
            self._log.warn(
                "ignoring {path}: {error}; it is written again once this instance is in step with its cluster",
                path=str(self.path),
                error=str(e),
            )
            return False
        return bool(document == self._document())

    def record(self) -> Deferred[None]:
        """
        Write the file (atomically), off the reactor thread when there is
        a writer.  Never fails: a write that fails is logged as a warning
        (the instance then proposes its own route and token into an empty
        store after its next start, as a new one does).
        """
        text = json.dumps(self._document())
        if self.writer is None:
            try:
                write_atomically(self.path, text)
            except OSError as e:
                self._unrecorded(str(e))
            return succeed(None)

        def failed(reason: Failure) -> None:
            if not reason.check(WriterStopped):
                self._unrecorded(reason.getErrorMessage() or type(reason.value).__name__)

        return self.writer.write(self.path, text).addErrback(failed)

    def _unrecorded(self, error: str) -> None:
        self._log.warn(
            "could not record in {path} that this instance is in step with its cluster ({error}): after a restart "
            "into an empty cluster store it will not wait for the instances in step to write the cluster's route "
            "and token back; fix what stops the gateway's user writing in STATE_DIR",
            path=str(self.path),
            error=error,
        )
