"""
Work on a large request body done in a thread of a small pool of its own
(L{BodyWorkers}), not on the reactor's thread: parsing and checking a chat
request (L{parse_chat_request <openclaw.dataplane.request.parse_chat_request>})
and encoding it for its provider (L{encode_request
<openclaw.dataplane.call.encode_request>}, Gemini's translation) is
Python work per message and per tool call, linear in the body but long
for a body of many of them, during which no other client of the process
would be served (re-attack s32: one key holder's bodies held up
C{/healthz} and the control plane for seconds).  A body of at most
L{OFFLOAD_BYTES} is still worked on in the reactor's thread, as before:
the thread's round trip (and a wait for the interpreter's lock) would
cost more than the work it saves.

The pool is the gateway's own rather than the reactor's
(C{reactor.getThreadPool()}), which resolves host names (Twisted's
C{GAIResolver}, for every call's provider connection): bodies that keep
its threads busy would hold up every call's name lookup; and its size
(L{OFFLOAD_THREADS}) is chosen for this work.  What runs there holds the
interpreter's lock as it works (the parse and the encoding are Python and
orjson, which keeps the lock), so the reactor's thread gets it back every
C{sys.getswitchinterval()}: the other clients wait a few of those, not
the whole body.  Measurements: C{bench/README.rst}.

A provider's whole answer longer than L{OFFLOAD_BYTES} is translated for
the client in the same threads (L{ChatCall
<openclaw.dataplane.call.ChatCall>}: Gemini's translation of many tool
calls), given with no key holder, as a failover's encoding is: never
refused.  Its log events are held there (L{HeldLog}) and published from
the reactor's thread.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable
from typing import Literal, TypeVar, cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from openclaw.threads import DaemonThread

#: A request body longer than this (bytes) is parsed, checked and encoded
#: for its provider in a thread (L{BodyWorkers}); a shorter one in the
#: reactor's thread: the longest it then holds up the other clients is
#: small against a provider's answer, and a thread's round trip is small
#: against the work on a longer one (figures: C{bench/README.rst}).
OFFLOAD_BYTES = 256 * 1024

#: Threads that work on large bodies at once (L{BodyWorkers}); more bodies
#: wait their turn.  Two: the interpreter runs one thread's Python at a
#: time, so more threads would not work faster, only take the
#: interpreter's lock from the reactor's thread more often; two let a
#: second large body start while another is being worked on.
OFFLOAD_THREADS = 2

#: Large bodies that may wait for a thread at once, besides the
#: L{OFFLOAD_THREADS} being worked on: a body past them is refused at once
#: (L{BodyWorkers.full}).  Each waits holding its bytes (up to
#: C{MAX_REQUEST_BYTES}), and for the bodies ahead of it (some 0.35 s for
#: one of 8 MB on a slow two-core host): 16 bound both, with the default
#: 8 MiB to some 150 MB (the two worked on with them) and a few seconds
#: (200 bodies of 8 MB from one key holder, queued
#: without a bound, took the process to 1.7 GB and held up every client
#: for 6-11 s).
QUEUE_BODIES = 16

#: Large bodies one key holder (a consumer, a C{GATEWAY_API_KEYS} key) may
#: have in the pool at once, worked on or waiting: one holder cannot take
#: the whole queue (L{QUEUE_BODIES}) from the others.  An agent sends one
#: large body per conversation turn; four let a few run at once.
HOLDER_BODIES = 4

#: The most seconds a refused large body is told to wait
#: (L{BodyWorkers.retry_after}), whatever the work took.
MAX_RETRY_AFTER = 60

T = TypeVar("T")

#: Why a body is not taken now (L{BodyWorkers.full}): the pool's queue is
#: full, or the holder has L{BodyWorkers.per_holder} bodies in it already.
Full = Literal["pool", "holder"]


@implementer(ILogObserver)
@attrs.define(eq=False)
class HeldLog:
    """
    The log events of one work done in a L{BodyWorkers} thread, held
    there (in the order they came) for the reactor's thread to publish
    (L{publish}) once the work's result is back: the work logs nothing
    from its thread (the log's observers, its file, are the process's).
    Filled by that work alone, read only once its result has come back.
    """

    events: list[LogEvent] = attrs.field(factory=list)

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def publish(self) -> None:
        """
        Hand the events held to the global log publisher, and forget them.
        Reactor thread.
        """
        events, self.events = self.events, []
        for event in events:
            globalLogPublisher(event)


class IBodyWorkersReactor(IReactorCore, IReactorFromThreads):
    """
    What L{BodyWorkers} asks of its reactor: the results of its threads
    handed back (C{IReactorFromThreads}, C{callFromThread}) and the
    shutdown trigger that stops the pool (C{IReactorCore}).
    """


@attrs.define(eq=False)
class BodyWorkers:
    """
    The threads that work on request bodies longer than L{above} bytes
    (at most L{size} at once; more wait their turn in the pool's queue,
    L{queue} of them at most, L{per_holder} of one key holder's in all:
    the caller asks L{full} first, and refuses the body past them).
    The pool starts at the first such body, and stops (L{stop}: its
    threads finish the work they have, then end) at the reactor's shutdown
    (C{"during", "shutdown"}), as Twisted's own pool does; its threads are
    daemon threads (as the consumers' database pool's), so that a process
    whose reactor never shuts down still exits.  Each start adds that
    shutdown trigger, and each L{stop} takes it back (as adbapi's
    C{ConnectionPool} its C{shutdownID}): a pool started and stopped
    again and again leaves the reactor one trigger at most.

    Built on the reactor's thread, and used only from there: L{run} is
    called in the reactor's thread, and its Deferred fires there.
    """

    #: None: no threads (a test's C{Clock}), every body worked on in the
    #: caller's thread, L{above} infinite.
    reactor: IBodyWorkersReactor | None
    #: Bodies longer than this (bytes) go to a thread.
    above: float = OFFLOAD_BYTES
    size: int = OFFLOAD_THREADS
    #: Bodies that may wait for a thread besides the L{size} worked on.
    queue: int = QUEUE_BODIES
    #: Bodies of one holder that may be in the pool, worked on or waiting.
    per_holder: int = HOLDER_BODIES
    #: Works given (L{run}) whose result has not come back yet.
    _given: int = attrs.field(default=0, init=False, repr=False)
    #: Of those, the works of each holder given with one (L{run}'s C{whose}).
    _holders: dict[Hashable, int] = attrs.field(factory=dict, init=False, repr=False)
    _pool: ThreadPool | None = attrs.field(default=None, init=False, repr=False)
    #: Seconds a body's work took in its thread, averaged (the last ones
    #: weigh most: L{_timed}), for L{retry_after}; 0 until one is done.
    _work_seconds: float = attrs.field(default=0.0, init=False, repr=False)
    #: The handle of the shutdown trigger that stops the pool
    #: (C{addSystemEventTrigger}'s), while the pool runs.
    _shutdown_trigger: object = attrs.field(default=None, init=False, repr=False)

    @classmethod
    def of(cls, reactor: object) -> BodyWorkers:
        """
        The workers of C{reactor}: threads when it provides
        L{IBodyWorkersReactor}'s interfaces (the real reactor), else none
        (L{above} infinite: every body is worked on where it is read).
        """
        if IReactorCore.providedBy(reactor) and IReactorFromThreads.providedBy(reactor):
            return cls(cast(IBodyWorkersReactor, reactor))
        return cls(None, above=math.inf)

    @property
    def given(self) -> int:
        """
        Works in the pool (L{run}), worked on or waiting for a thread.
        """
        return self._given

    def full(self, whose: Hashable) -> Full | None:
        """
        Why a body of the holder C{whose} (L{run}'s) is not to be given now,
        or None: C{"holder"} when it has L{per_holder} in the pool already,
        else C{"pool"} when L{size} are worked on and L{queue} wait.
        Never full without threads (L{reactor} None).  Reactor thread.
        """
        if self.reactor is None:
            return None
        if self._holders.get(whose, 0) >= self.per_holder:
            return "holder"
        if self._given >= self.size + self.queue:
            return "pool"
        return None

    def retry_after(self) -> int:
        """
        Seconds a body refused now (L{full}) is told to wait before it is
        sent again (C{Retry-After}, RFC 9110 section 10.2.3): the time the
        threads take to work through the bodies given to them (L{given})
        at the recent time per body, at least 1, at most
        L{MAX_RETRY_AFTER} (16 bodies of 8 MB from one key
        told 1 s ran out of the openai SDK's two retries).  Reactor thread.
        """
        waiting = self._work_seconds * self._given / self.size
        return max(1, min(MAX_RETRY_AFTER, math.ceil(waiting)))

    def _timed(self, result: tuple[T, float]) -> T:
        """
        Keep a work's time (L{_work_seconds}: an average in which the last
        work weighs a quarter) and pass its result on.  Reactor thread.
        """
        value, seconds = result
        self._work_seconds = seconds if not self._work_seconds else 0.75 * self._work_seconds + 0.25 * seconds
        return value

    def run(self, work: Callable[[], T], whose: Hashable | None = None) -> Deferred[T]:
        """
        C{work()} in one of the pool's threads (after the works queued
        before it, when all L{size} threads are busy): C{work} must touch
        only its request's own data and immutable objects (no log, no
        metrics, no shared state).  Called in the reactor's thread; the
        Deferred fires there, with C{work}'s result or its exception.

        It is counted in the pool (L{full}) until then, among C{whose}'s
        works when given (a request's key holder); a work given without
        (a call's encoding again for its failover) is never refused.

        @raise RuntimeError: this has no threads (L{reactor} None).
        """
        reactor = self.reactor
        if reactor is None:
            raise RuntimeError("these body workers have no threads: work on the body where it is read")
        self._given += 1
        if whose is not None:
            self._holders[whose] = self._holders.get(whose, 0) + 1
        pool = self._pool
        if pool is None:
            pool = self._pool = ThreadPool(minthreads=0, maxthreads=self.size, name="openclaw-bodies")
            pool.threadFactory = DaemonThread
            pool.start()
            self._shutdown_trigger = reactor.addSystemEventTrigger("during", "shutdown", self._shutdown)

        def back(result: object) -> object:
            self._given -= 1
            if whose is not None:
                left = self._holders.pop(whose) - 1
                if left:
                    self._holders[whose] = left
            return result

        def timed() -> tuple[T, float]:
            # Only this work's own values are touched in the thread.
            began = time.monotonic()
            return work(), time.monotonic() - began

        done = deferToThreadPool(reactor, pool, timed).addCallback(self._timed)
        done.addBoth(back)
        return done

    def stop(self) -> None:
        """
        Stop the pool, if it runs: its threads finish the work they have
        (this waits for them), then end; its shutdown trigger is removed.
        Once stopped, it starts again at the next L{run}.  Reactor thread.
        """
        trigger, self._shutdown_trigger = self._shutdown_trigger, None
        if trigger is not None and self.reactor is not None:
            self.reactor.removeSystemEventTrigger(trigger)
        self._shutdown()

    def _shutdown(self) -> None:
        """
        Stop the pool, if it runs (L{stop}'s work): the reactor's shutdown
        trigger (C{"during", "shutdown"}), which the reactor has taken out
        of its list as it runs it (removing it again would fail: the
        C{ValueError} of C{removeSystemEventTrigger}).  Reactor thread.
        """
        self._shutdown_trigger = None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()
