"""
The gateway's file writes after start-up, off the reactor thread.

A write of the state file (C{switch_provider}) or of C{TOKEN_FILE}
(C{rotate_token}, a cluster's token adopted) fsyncs: on a loaded disk, NFS
or a full journal that takes seconds, during which a write on the reactor
thread stalled every agent's call and every control connection.
L{FileWriter} runs them in a thread of its own, one at a time, in the
order they were asked.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from openclaw.deferreds import InFlight, shielded
from openclaw.files import write_atomically
from openclaw.loops import LoggedStep
from openclaw.reactors import IWriterReactor
from openclaw.threads import DaemonThread

T = TypeVar("T")

#: The name of the writer's thread (in a thread dump: C{py-spy}, C{gdb}).
THREAD_NAME = "openclaw-file-writer"

#: How often, in seconds, a stop waiting for a file write says it still
#: waits (L{FileWriter.stopService}).
STILL_WAITING_SECONDS = 10.0


class WriterStopped(OSError):
    """
    A write asked once the gateway's stop had closed the writer
    (L{FileWriter.stopService}): not made, so that nothing lands after the
    token file is removed.  An C{OSError} (C{ESHUTDOWN}), as a write that
    failed is: its callers log it and answer as for one.
    """

    def __init__(self) -> None:
        super().__init__(errno.ESHUTDOWN, "the gateway is stopping: no more files are written")


class FileWriter(Service):
    """
    Runs the gateway's blocking file jobs (a write, with the reads that
    decide it) in one thread of its own, one at a time, in the order they
    were asked, and fires each job's Deferred on the reactor thread.

    Why a pool of its own, of one thread (L{ThreadPool}, C{maxthreads=1}),
    and not the reactor's: one thread and the pool's first-in first-out
    queue put the writes of a file on disk in the order they were asked
    (the last switch or rotation wins, always) with no lock to take; a
    blocked disk holds this one thread, never one of the reactor's pool
    (name resolution of the providers' hosts); and the gateway's stop can
    wait for exactly these writes (L{stopService}) before the token file
    is removed.  The pool's thread is started with the service (after
    twistd's fork), not when it is built, and is a daemon thread
    (L{DaemonThread}): the stop waits for the writes, the interpreter
    need not (a writer never stopped kept the process from exiting).

    A job asked before L{startService} waits in the pool's queue until it
    starts; one asked after L{stopService} fails with L{WriterStopped}.

    @ivar write_file: the blocking write of a file's whole text (C{path},
        C{text}; L{write_atomically} unless given): the jobs call it, in
        the writer's thread.  A test gives one that blocks.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: IWriterReactor,
        write_file: Callable[[Path, str], None] = write_atomically,
        still_waiting_seconds: float = STILL_WAITING_SECONDS,
    ) -> None:
        """
        Reactor thread (or before the reactor runs).

        @param reactor: the reactor the jobs' Deferreds fire on, and the
            clock of the stop's lines while it waits for them.
        @param write_file: see L{write_file}.
        @param still_waiting_seconds: how often, in seconds, a stop
            waiting for a write says so again (L{stopService}).
        """
        self._reactor = reactor
        self.write_file = write_file
        self._still_waiting_seconds = still_waiting_seconds
        self._pool = ThreadPool(minthreads=0, maxthreads=1, name=THREAD_NAME)
        self._pool.threadFactory = DaemonThread
        #: The jobs asked and not finished, in the order asked (the first
        #: one is running), each with what it writes (L{run}'s C{what}).
        self._pending: list[tuple[InFlight[Any], str]] = []
        #: L{stopService} was called: no job is taken any more.
        self._closed = False

    @property
    def pending(self) -> int:
        """
        How many jobs were asked and have not finished (the one running
        included).  Reactor thread.
        """
        return len(self._pending)

    def startService(self) -> None:
        """
        Start the pool (its thread is made when the first job comes).
        Reactor thread.
        """
        super().startService()
        if not self._pool.started and not self._closed:
            self._pool.start()

    def run(
        self, job: Callable[[], T], dropped: Callable[[Failure], object] | None = None, what: str = "a file"
    ) -> Deferred[T]:
        """
        Run C{job} in the writer's thread after every job asked before it;
        fire with what it returns, or fail with what it raises, on the
        reactor thread.  Reactor thread.

        A job cannot be stopped once asked: cancelling the returned
        Deferred (a command cut short at the stop) leaves the job to run
        (waited for by L{stopService}); should it fail then, its failure
        goes to C{dropped} (L{shielded}), or, without one, is logged.

        @param what: what the job writes, for the stop's lines while it
            waits for it ("the write of C{what}"): a path, or a file's
            name and path.
        @raise WriterStopped: (as a failure) the writer was stopped; the
            job is not run.
        """
        if self._closed:
            return fail(WriterStopped())
        flight: InFlight[T] = InFlight()
        entry = (flight, what)
        self._pending.append(entry)

        def finished(result: T | Failure) -> None:
            self._pending.remove(entry)
            flight.end(result)

        deferToThreadPool(self._reactor, self._pool, job).addBoth(finished)
        return shielded(flight.observe(), self._dropped if dropped is None else dropped)

    def _dropped(self, reason: Failure) -> None:
        """
        A job failed (C{reason}) once who asked for it had given up: said,
        as nothing else would.  Reactor thread.
        """
        self._log.failure("a file write failed after the command that asked for it was cut short", reason)

    def write(self, path: Path, text: str, dropped: Callable[[Failure], object] | None = None) -> Deferred[None]:
        """
        Replace C{path} with C{text} (L{write_file}) in the writer's
        thread, after every job asked before it (C{dropped}: as
        L{run}'s).  Reactor thread.

        @raise OSError: (as a failure) the write failed (L{write_atomically}),
            or the writer was stopped (L{WriterStopped}).
        """
        write_file = self.write_file
        return self.run(lambda: write_file(path, text), dropped, str(path))

    def stopService(self) -> Deferred[None]:
        """
        Take no more jobs (a job asked from now on fails with
        L{WriterStopped}), let those asked finish (or fail: each job's
        caller logs its own failure), then stop the pool (its thread, idle
        by then, joined).  Fires once they have, never fails: a disk that
        takes seconds to write keeps the gateway's stop waiting, before
        the token file is removed (L{openclaw.service.HeldLocks}), so that
        no write lands after it.  Reactor thread.

        The wait has no bound of its own (a file is never left half
        written; a supervisor's stop timeout, systemd's C{TimeoutStopSec},
        bounds it): it is logged when it begins, then again every
        C{still_waiting_seconds} while it lasts, naming the write under
        way and how long the stop has waited.
        """
        super().stopService()
        self._closed = True
        waiting = [flight for flight, _ in self._pending]
        reminder: LoopingCall | None = None
        if waiting:
            self._log.info(
                "waiting for {count} file write(s) to finish before stopping ({what})",
                count=len(waiting),
                what=", ".join(dict.fromkeys(what for _, what in self._pending)),
            )
            since = self._reactor.seconds()
            reminder = LoopingCall(
                LoggedStep(
                    lambda: self._still_waiting(since),
                    self._log,
                    "the log line of the stop's wait for the file writes",
                )
            )
            reminder.clock = self._reactor
            reminder.start(self._still_waiting_seconds, now=False)

        def stopped(_: object) -> None:
            if reminder is not None and reminder.running:
                reminder.stop()
            if self._pool.started:
                self._pool.stop()

        # Each job's caller has a Deferred of its own (InFlight): this
        # waits through another, whatever the job's result.
        return gatherResults([flight.observe().addErrback(lambda _: None) for flight in waiting]).addCallback(stopped)

    def _still_waiting(self, since: float) -> None:
        """
        Say that the stop still waits (since C{since}, in the reactor's
        seconds) for the write under way.  Reactor thread.
        """
        if not self._pending:
            return
        _, what = self._pending[0]
        self._log.warn(
            "still waiting for the write of {what}, {seconds:.0f} s ({count} file write(s) left): the stop waits "
            "for it so that no file is left half written; if its disk (or NFS server) does not answer, a "
            "supervisor's stop timeout (systemd's TimeoutStopSec) ends the process",
            what=what,
            seconds=self._reactor.seconds() - since,
            count=len(self._pending),
        )
