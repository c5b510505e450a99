"""
The gateway's file writes after start-up, off the reactor thread.

A write of the state file (C{switch_provider}) or of C{TOKEN_FILE}
(C{rotate_token}, a cluster's token adopted) fsyncs: on a loaded disk, NFS
or a full journal that takes seconds, during which a write on the reactor
thread stalled every agent's call and every control connection.
L{FileWriter} runs them in a thread of its own, one at a time, in the
order they were asked; a write of a file asked while another of the same
file waits, not begun, takes its place (only the last one need be
written); at the gateway's stop, the writes not begun are dropped.
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable, Hashable
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
    (L{FileWriter.close}), or asked before and not begun then (dropped):
    not made, so that nothing lands after the token file is removed, and
    a stop waits for no queue of writes.  An C{OSError} (C{ESHUTDOWN}),
    as a write that failed is: its callers answer that the gateway is
    stopping and what was not saved.

    @ivar dropped: it was asked before the stop, and dropped then.
    """

    def __init__(self, dropped: bool = False) -> None:
        super().__init__(
            errno.ESHUTDOWN,
            "the gateway is stopping: the write had not begun, and was dropped"
            if dropped
            else "the gateway is stopping: no more files are written",
        )
        self.dropped = dropped


class _Job:
    """
    A job asked of L{FileWriter} and not finished: what it runs, what it
    writes (for the stop's lines), the key writes of one file are merged
    by (L{None}: never merged), and its callers, waiting (C{flight}).
    Reactor thread only.
    """

    def __init__(self, job: Callable[[], Any], what: str, key: Hashable | None) -> None:
        self.job = job
        self.what = what
        self.key = key
        self.flight: InFlight[Any] = InFlight()


class FileWriter(Service):
    """
    Runs the gateway's blocking file jobs (a write, with the reads that
    decide it) in one thread of its own, one at a time, in the order they
    were asked, and fires each job's Deferred on the reactor thread.

    Writes of one file are merged (L{write}; L{run}'s C{merge}): one asked
    while another of the same file waits, not begun, takes its place, and
    the callers of both are answered by it, once on disk (or failed): the
    file ends as the last value asked, each caller is answered once its
    value or a later one is on disk, and a flood of writes of one file
    (C{switch_provider} over and over on a slow disk) queues one write,
    not one per command.

    Why a pool of its own, of one thread (L{ThreadPool}, C{maxthreads=1}),
    and not the reactor's: one thread, given one job at a time from the
    writer's first-in first-out queue (on the reactor thread, where a
    job not begun can be merged or dropped), puts the writes of a file on
    disk in the order they were asked (the last switch or rotation wins,
    always) with no lock to take; a blocked disk holds this one thread,
    never one of the reactor's pool (name resolution of the providers'
    hosts); and the gateway's stop can wait for exactly the write under
    way (L{stopService}) before the token file is removed.  The pool's thread is started with the service (after
    twistd's fork), not when it is built, and is a daemon thread
    (L{DaemonThread}): the stop waits for the writes, the interpreter
    need not (a writer never stopped kept the process from exiting).

    A job asked before L{startService} waits in the writer's queue until
    it starts.  At the gateway's stop (L{close}, then L{stopService}) the
    jobs not begun are dropped (failing with L{WriterStopped}) and those
    asked after fail with it; the one under way is waited for, never cut.

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
        #: The job in the writer's thread, if any.
        self._running: _Job | None = None
        #: The jobs asked and not begun, in the order asked.
        self._queue: deque[_Job] = deque()
        #: The jobs of L{_queue} that merge (L{run}'s C{merge}), by key.
        self._mergeable: dict[Hashable, _Job] = {}
        #: L{close} was called: no job is taken any more.
        self._closed = False

    @property
    def pending(self) -> int:
        """
        How many jobs were asked and have not finished (the one running
        included; writes merged count as one).  Reactor thread.
        """
        return len(self._queue) + (self._running is not None)

    def startService(self) -> None:
        """
        Start the pool (its thread is made when the first job comes).
        Reactor thread.
        """
        super().startService()
        if not self._pool.started and not self._closed:
            self._pool.start()
            self._next()

    def run(
        self,
        job: Callable[[], T],
        dropped: Callable[[Failure], object] | None = None,
        what: str = "a file",
        merge: Hashable | None = None,
    ) -> Deferred[T]:
        """
        Run C{job} in the writer's thread after every job asked before it;
        fire with what it returns, or fail with what it raises, on the
        reactor thread.  Reactor thread.

        With C{merge} (a file's path): should a job asked with the same
        C{merge} wait, not begun, C{job} takes its place (and its C{what}),
        and its callers are answered as this one, by C{job}'s result; the
        job it replaced never runs.  O(1).

        A job cannot be stopped once asked: cancelling the returned
        Deferred (a command cut short at the stop) leaves the job to run
        (waited for by L{stopService}; dropped by L{close} if not begun
        then); should it fail then, its failure
        goes to C{dropped} (L{shielded}), or, without one, is logged.

        @param what: what the job writes, for the stop's lines while it
            waits for it ("the write of C{what}"): a path, or a file's
            name and path.
        @raise WriterStopped: (as a failure) the writer was closed (the
            gateway's stop) before the job began; it is not run.
        """
        if self._closed:
            return fail(WriterStopped())
        entry = self._mergeable.get(merge) if merge is not None else None
        if entry is not None:
            entry.job, entry.what = job, what
        else:
            entry = _Job(job, what, merge)
            self._queue.append(entry)
            if merge is not None:
                self._mergeable[merge] = entry
        observed: Deferred[T] = entry.flight.observe()
        self._next()
        return shielded(observed, self._dropped if dropped is None else dropped)

    def _next(self) -> None:
        """
        Begin the first job waiting, unless one runs or the pool is not
        started.  Reactor thread.
        """
        if self._running is not None or not self._queue or not self._pool.started:
            return
        entry = self._running = self._queue.popleft()
        if entry.key is not None:
            del self._mergeable[entry.key]

        def finished(result: object) -> None:
            self._running = None
            entry.flight.end(result)
            self._next()

        deferToThreadPool(self._reactor, self._pool, entry.job).addBoth(finished)

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
        L{run}'s); merged with a write of C{path} waiting, not begun
        (L{run}'s C{merge}): fires once C{text}, or a text asked after
        it, is on disk.  Reactor thread.

        @raise OSError: (as a failure) the write failed (L{write_atomically}),
            or the writer was stopped (L{WriterStopped}).
        """
        write_file = self.write_file
        return self.run(lambda: write_file(path, text), dropped, str(path), merge=path)

    def close(self) -> int:
        """
        At the gateway's stop, first thing: take no more jobs (a job asked
        from now on fails with L{WriterStopped}) and drop those not begun,
        each failing with L{WriterStopped} (C{dropped}), its callers
        answering what was not saved; the one under way goes on
        (L{stopService} waits for it).  Logged once, when any was dropped.
        Again, nothing.  Reactor thread.

        @return: how many jobs were dropped (merged writes as one).
        """
        self._closed = True
        dropped = list(self._queue)
        self._queue.clear()
        self._mergeable.clear()
        if dropped:
            self._log.info(
                "the stop dropped {count} file write(s) not begun ({what}): nothing of them is saved, and their "
                "commands are told so; the write under way, if any, is finished",
                count=len(dropped),
                what=", ".join(dict.fromkeys(entry.what for entry in dropped)),
            )
        for entry in dropped:
            entry.flight.end(Failure(WriterStopped(dropped=True)))
        return len(dropped)

    def stopService(self) -> Deferred[None]:
        """
        Take no more jobs and drop those not begun (L{close}), let the one
        under way finish (or fail: its caller logs its own failure), then
        stop the pool (its thread, idle by then, joined).  Fires once it
        has, never fails: a disk that
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
        self.close()
        running = self._running
        waiting = [] if running is None else [running.flight]
        reminder: LoopingCall | None = None
        if running is not None:
            self._log.info(
                "waiting for {count} file write(s) to finish before stopping ({what})",
                count=len(waiting),
                what=running.what,
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
        running = self._running
        if running is None:
            return
        self._log.warn(
            "still waiting for the write of {what}, {seconds:.0f} s ({count} file write(s) left): the stop waits "
            "for it so that no file is left half written; if its disk (or NFS server) does not answer, a "
            "supervisor's stop timeout (systemd's TimeoutStopSec) ends the process",
            what=running.what,
            seconds=self._reactor.seconds() - since,
            count=self.pending,
        )
