"""
C{/metrics} of a C{--workers N} gateway: every worker's series in each
scrape, whichever worker the kernel gave the scrape's connection to.

Each worker serves its own exposition (its registry, as a single gateway
serves it at C{/metrics}) on a UNIX socket of its own, C{<index>.sock} in
a directory the supervisor made for this run (L{make_socket_directory}:
mode 0700, in the temporary directory; each socket mode 0600), so that
only the gateway's user can reach it, and never over the network.  The
worker a scrape reaches reads its siblings' expositions over those
sockets, in parallel, each within L{SIBLING_SCRAPE_TIMEOUT_SECONDS}
(L{WorkersExposition}), and answers with them all, every series labelled
C{worker="<index>"}, each family's series together: a sibling answers with
its registry's metric families as JSON (L{encode_families}), rebuilt as
C{prometheus_client} metric families (L{decode_families}), and
C{prometheus_client} writes the exposition of them all.
Counters and histograms are not summed: a worker started again resets
only its own series, which Prometheus' C{rate()} takes as a reset of
that series, while a sum over workers would drop.

A sibling that does not answer in time (starting, stopping, stuck) is left
out of that scrape, which is answered all the same: C{openclaw_workers_scraped}
says how many workers' series it holds (C{openclaw_workers}: how many
run), C{openclaw_worker_scrape_failures_total{worker,sibling}} counts the
scrapes worker C{worker} answered without C{sibling}'s, and a warning is
logged at most once a minute per sibling (L{FAILURE_LOG_SECONDS}).

The private socket answers with its worker's own series only: it never
asks the siblings (no scrape fans out twice).  A worker whose socket (or
the whole directory) a cleaner of the temporary directory removed listens
on it again within a second or so (L{PrivateSocketWatch}).

Not C{prometheus_client}'s multiprocess mode: it reads values the
processes write to shared files, which the gateway's gauges computed when
scraped (C{Gauge.set_function}: connections, breakers, pending rows) do
not do.  A sibling's families are rebuilt as C{prometheus_client.Metric}s
(exported by the library, and what its own parser and multiprocess
collector build), samples added with C{Metric.add_sample}: the typed
families (C{CounterMetricFamily}, ...) take whole series, not the samples
a registry's C{collect()} gives.

Nor the text exposition read back by C{prometheus_client.parser}: the
parser is pure Python, many times slower than JSON, and runs on the
reading worker's reactor thread, where a scrape of several siblings with
many consumers' series would hold every call on that worker; and the
text does not round-trip exactly (a HELP text's trailing blanks are
stripped; some values it reads, such as an infinite timestamp, its own
writer refuses).  The JSON carries C{prometheus_client}'s own families
and samples as they are.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import attrs
import orjson
from prometheus_client import CollectorRegistry, Counter, Metric, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily
from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred, fail, gatherResults, maybeDeferred
from twisted.internet.defer import TimeoutError as DeferredTimeoutError
from twisted.internet.endpoints import UNIXClientEndpoint, UNIXServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IReactorTime,
    IReactorUNIX,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseFailed
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from openclaw.deferreds import InFlight
from openclaw.loops import LoggedStep
from openclaw.providers.fetch import read_body
from openclaw.reactors import IClientReactor
from openclaw.settings import ConfigError
from openclaw.settings.permissions import check_private_directories
from openclaw.web import head_or_body

#: How long the worker a scrape reached waits for each sibling's series
#: (connection and whole answer, in seconds) before it answers without
#: them.  Well within Prometheus' default C{scrape_timeout} (10 s).
SIBLING_SCRAPE_TIMEOUT_SECONDS = 2.0
#: A sibling left out of scrapes is logged at most once in this many
#: seconds (each scrape is counted: C{openclaw_worker_scrape_failures_total}).
FAILURE_LOG_SECONDS = 60.0
#: The name of the run's socket directory begins with this (then
#: C{mkdtemp}'s random part).
SOCKET_DIRECTORY_PREFIX = "openclaw-workers-"
#: The longest path a UNIX socket may be bound to on Linux: C{sun_path}'s
#: 108 bytes less the terminating NUL (unix(7)).
MAX_SOCKET_PATH_BYTES = 107
#: How often a worker looks that its private socket is still there
#: (L{PrivateSocketWatch}), in seconds.
SOCKET_CHECK_SECONDS = 1.0
#: The label every worker's series carry in a C{--workers} scrape.
WORKER_LABEL = "worker"
#: The workers' events (as L{openclaw.cluster.workers}'); not on a class,
#: whose name a L{Logger} there would take as namespace (L{Logger.__get__}).
_log = Logger(namespace="openclaw.workers")


@attrs.frozen
class WorkerSockets:
    """
    Where the workers of one C{--workers} run serve their own series:
    C{<directory>/<index>.sock} for each of the C{count} workers.
    """

    directory: Path
    count: int

    def path(self, index: int) -> Path:
        """
        Worker C{index}'s socket (0 to C{count - 1}).
        """
        return self.directory / f"{index}.sock"


def make_socket_directory(count: int, parent: str | None = None) -> WorkerSockets:
    """
    Make this run's socket directory for C{count} workers: a new one
    (C{tempfile.mkdtemp}: mode 0700, a name no other run has, so that a
    directory left by a run that was killed never stands in the way) in
    C{parent}, by default the temporary directory (C{TMPDIR}, else
    C{/tmp}; under the systemd unit's C{PrivateTmp=yes} the service's
    own).  Not under C{STATE_DIR}: a socket's path is limited to
    L{MAX_SOCKET_PATH_BYTES}, which a deep state directory would pass.

    The directories it is made in must keep others from renaming it
    away and putting their own in its place (a worker connects to its
    siblings by path): each, up to C{/}, held to the rule of secret
    files' directories (L{openclaw.settings.permissions.check_private_directories}:
    the gateway's user's or root's, written by no one else unless sticky
    as C{/tmp} is).

    @raise ConfigError: it cannot be made, its parent lets others replace
        it, or its sockets' paths would be too long (the line says to
        point C{TMPDIR} elsewhere).
    """
    where = parent or tempfile.gettempdir()
    check_private_directories(
        Path(where) / SOCKET_DIRECTORY_PREFIX,
        f"the directory of --workers' metrics sockets (made in {where!r}: TMPDIR)",
        "set TMPDIR to a directory only the gateway's user may write, or a sticky one such as /tmp",
    )
    try:
        directory = Path(tempfile.mkdtemp(prefix=SOCKET_DIRECTORY_PREFIX, dir=parent))
    except OSError as e:
        raise ConfigError(
            f"--workers cannot make the directory of its workers' metrics sockets in {where!r} ({e.strerror}); "
            "set TMPDIR to a directory the gateway's user may write"
        ) from None
    sockets = WorkerSockets(directory, count)
    longest = sockets.path(count - 1)
    if len(os.fsencode(longest)) > MAX_SOCKET_PATH_BYTES:
        directory.rmdir()
        raise ConfigError(
            f"--workers would bind its workers' metrics sockets at paths such as {str(longest)!r}, longer than "
            f"a UNIX socket's {MAX_SOCKET_PATH_BYTES} bytes; set TMPDIR to a shorter directory (such as /tmp)"
        )
    return sockets


def ensure_socket_directory(sockets: WorkerSockets) -> None:
    """
    Make the run's socket directory again (mode 0700) if it has gone (a
    cleaner of the temporary directory removed it), before a worker is
    started (it serves without it all the same, its watch listening
    there once it can: L{PrivateSocketWatch}).
    """
    with contextlib.suppress(FileExistsError):
        sockets.directory.mkdir(mode=0o700)


def remove_socket_directory(sockets: WorkerSockets) -> None:
    """
    Remove the run's socket directory once its workers have stopped: the
    sockets a worker killed left behind (one that stops removes its own),
    then the directory, unless something else is in it.  Not a directory
    it would refuse to listen in (L{socket_directory_problem}: another
    owner's, or a link, put at its name once a cleaner removed it): that
    is not the run's, and nothing in it is removed.
    """
    if socket_directory_problem(sockets.directory) is not None:
        return
    for index in range(sockets.count):
        path = sockets.path(index)
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                path.unlink()
    with contextlib.suppress(OSError):
        sockets.directory.rmdir()


def remove_empty_directory(sockets: WorkerSockets) -> None:
    """
    Remove the run's socket directory if it is empty: by a worker stopping
    after its parent, which would have removed it, was killed; the last
    worker to stop removes it (the others find their siblings' sockets
    in it still).  Not a directory it would refuse to listen in
    (L{remove_socket_directory}).
    """
    if socket_directory_problem(sockets.directory) is not None:
        return
    with contextlib.suppress(OSError):
        sockets.directory.rmdir()


def socket_directory_problem(directory: Path, euid: int | None = None) -> str | None:
    """
    What makes C{directory} unfit for a worker's private socket, or
    L{None}: it must be a directory (not a link) of the gateway's user
    that no one else may read, write or enter (mode 0700 or narrower), as
    L{make_socket_directory} makes it.
    """
    euid = os.geteuid() if euid is None else euid
    try:
        held = os.lstat(directory)
    except OSError as e:
        return e.strerror or str(e)
    if not stat.S_ISDIR(held.st_mode):
        return "not a directory"
    if held.st_uid != euid:
        return f"it belongs to uid {held.st_uid}, not the gateway's user (uid {euid})"
    mode = stat.S_IMODE(held.st_mode)
    if mode & 0o077:
        return f"others than its owner may use it (mode {mode:04o})"
    return None


@implementer(IStreamServerEndpoint)
@attrs.define
class PrivateSocketEndpoint:
    """
    A worker's private metrics socket: a UNIX socket, mode 0600, at
    C{path} in the run's directory (L{make_socket_directory}).  A socket
    left there by this worker's predecessor (killed: its socket was not
    removed) is removed first; only this worker binds this path while it
    runs, its predecessor has ended before it was started.
    """

    reactor: IReactorUNIX
    path: Path

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as e:
            return fail(CannotListenError(None, str(self.path), e))
        endpoint = UNIXServerEndpoint(self.reactor, str(self.path), mode=0o600, wantPID=False)
        listening: Deferred[IListeningPort] = endpoint.listen(protocolFactory)
        return listening


class PrivateSocketWatch(Service):
    """
    In a worker: listen on its private socket (C{sockets.path(index)},
    through C{listening}, the service listening there:
    L{PrivateSocketEndpoint}, which binds it mode 0600) while running, and
    every C{interval} seconds look that it is still there.

    The worker's API does not wait on it: a directory that cannot be used
    when the worker starts (its parent could not make it again, or it is
    of another owner or mode, as L{socket_directory_problem} says) is
    logged once, an error, and looked at again at every check; the worker
    serves meanwhile (a worker started again after a crash is not ended by
    a fault of its metrics' directory), only its series missing from the
    scrapes.

    A cleaner of the temporary directory (C{systemd-tmpfiles},
    C{tmpreaper}) may remove the socket, or the whole directory, while the
    gateway runs: the siblings could then no longer read this worker's
    series.  Once it has gone: the directory is made again if it has gone
    (L{ensure_socket_directory}: mode 0700) and checked, and C{listening}
    is stopped and started again; logged once each time, a warning.

    Gone means no socket at the path: nothing, or anything else (the
    empty file below, left by a listen that failed, EMFILE say): the next
    check listens again, whatever the last one met.

    Twisted's UNIX port removes its path when it stops listening, and
    fails if the path has gone, before it closes its socket
    (C{twisted.internet.unix.Port.connectionLost}, Twisted 26.10: not a
    documented contract, so the watch's tests stop a real port): an empty
    file is put there first, for it to remove, and removed before
    listening if it is still there (no port was listening to remove it).
    """

    def __init__(
        self,
        reactor: IReactorTime,
        sockets: WorkerSockets,
        index: int,
        listening: IService,
        interval: float = SOCKET_CHECK_SECONDS,
    ) -> None:
        self.sockets = sockets
        self.index = index
        self.listening = listening
        self.interval = interval
        self._check = LoopingCall(
            LoggedStep(self.check, _log, f"the check of worker {index}'s metrics socket {sockets.path(index)}")
        )
        self._check.clock = reactor
        #: The problem last logged (the directory refused, or the listen
        #: failing): not logged again while it lasts.
        self._problem: str | None = None
        #: It has listened on the socket since it started: a socket there
        #: before is not its own (a killed predecessor's, which the
        #: endpoint replaces), and one gone since is said to have gone (a
        #: warning).
        self._listened = False

    def startService(self) -> None:
        super().startService()
        self._listened = False
        self._check.start(self.interval, now=True)

    def stopService(self) -> Deferred[None]:
        if self._check.running:
            self._check.stop()
        super().stopService()
        stopped: Deferred[None] = maybeDeferred(self.listening.stopService)
        # Its parent (a MultiService) does not consume its children's
        # failures: one is logged here, the stop goes on.
        return stopped.addErrback(
            lambda reason: _log.debug(
                "stopping the listen on {path}: {error}",
                path=str(self.sockets.path(self.index)),
                error=reason.getErrorMessage(),
            )
        )

    def check(self) -> Deferred[None] | None:
        """
        Listen (again) if the socket is not there; fires once listening
        (never fails: a problem is logged).
        """
        path = self.sockets.path(self.index)
        if self._listened and _socket_at(path):
            return None
        made = False
        try:
            # exists() raises too: a directory above it this user may not
            # search.
            made = not self.sockets.directory.exists()
            ensure_socket_directory(self.sockets)
            problem = socket_directory_problem(self.sockets.directory)
        except OSError as e:
            problem = e.strerror or str(e)
        if problem is not None:
            self._failed(
                "worker {index}'s metrics socket {path}: its directory cannot be used ({problem}); its series are "
                "missing from every scrape meanwhile (the worker serves on, and looks again every {interval:g} s); if "
                "something else took the directory's name, stop the gateway, look at it and start the gateway again",
                problem,
                path,
            )
            return None
        with contextlib.suppress(OSError):
            # For the port that stops to remove (not a socket: a sibling
            # connecting meanwhile is refused, as when it is missing).
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        stopped: Deferred[object] = maybeDeferred(self.listening.stopService)

        def listen(result: object) -> None:
            if isinstance(result, Failure):
                # The file taken away in between: the old socket is not
                # closed (Twisted's port stopped before it closes it).
                _log.debug("stopping the listen on {path}: {error}", path=str(path), error=result.getErrorMessage())
            if not self.running:
                return
            try:
                if not _socket_at(path):
                    # The empty file above, if no port was listening to
                    # remove it (its last listen failed): a bind fails on it.
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                self.listening.startService()
            except Exception as e:
                self._failed(
                    "worker {index}'s metrics socket {path}: it cannot listen on it ({problem}); its series are "
                    "missing from every scrape meanwhile (the worker serves on, and tries again every {interval:g} s)",
                    str(e),
                    path,
                )
                return
            self._problem = None
            again, self._listened = self._listened, True
            if not again:
                return
            gone = "and its directory had gone; made the directory again (mode 0700) and" if made else "had gone;"
            _log.warn(
                "worker {index}'s metrics socket {path} " + gone + " listening on it again: its series are in every "
                "scrape again.  Something removed it while the gateway ran: if a cleaner of the temporary "
                "directory (tmpreaper, a tmpfiles.d age), keep it off directories named {prefix}* ({directory})",
                index=self.index,
                prefix=SOCKET_DIRECTORY_PREFIX,
                path=str(path),
                directory=str(self.sockets.directory),
                directory_made=made,
            )

        return stopped.addBoth(listen)

    def _failed(self, line: str, problem: str, path: Path) -> None:
        """
        Log C{line} (an error) unless C{problem} was the last one logged.
        """
        if problem == self._problem:
            return
        self._problem = problem
        _log.error(line, index=self.index, path=str(path), problem=problem, interval=self.interval)


def _socket_at(path: Path) -> bool:
    """
    Whether a socket is at C{path} (what a listening UNIX port binds):
    False when nothing, or something else, is.  When it cannot be told (a
    directory above it this user may not search), True: nothing is done
    about it.
    """
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True


def encode_families(registry: CollectorRegistry) -> bytes:
    """
    C{registry}'s metric families (its C{collect()}) as JSON, for a sibling
    to rebuild (L{decode_families}): a list of C{[name, documentation,
    type, unit, samples]}, each sample C{[name, labels, value, timestamp]}
    (the value a number, or its Python spelling when not finite:
    C{"inf"}, C{"-inf"}, C{"nan"}; the timestamp seconds or null).
    Exemplars and native histograms, which the gateway's metrics have
    none of, are left out.
    """
    return orjson.dumps(
        [
            [
                family.name,
                family.documentation,
                family.type,
                family.unit,
                [
                    [
                        sample.name,
                        sample.labels,
                        sample.value if math.isfinite(sample.value) else repr(sample.value),
                        None if sample.timestamp is None else float(sample.timestamp),
                    ]
                    for sample in family.samples
                ],
            ]
            for family in registry.collect()
        ]
    )


def decode_families(encoded: bytes, worker: int) -> list[Metric]:
    """
    The metric families of L{encode_families}' JSON, each sample labelled
    C{worker="<worker>"} (L{WORKER_LABEL}).

    Every part is checked to be of the shape L{encode_families} gives
    (texts, labels of text, numbers): one that is not (a sibling of
    another version, or a bug) would make C{prometheus_client} fail to
    write the whole scrape's exposition, not only this worker's series.

    @raise ValueError: it is not such JSON (not a worker of this
        gateway's).
    """
    label = str(worker)
    found = []
    try:
        document = orjson.loads(encoded)
        if not isinstance(document, list):
            raise TypeError("not a list")
        for name, documentation, kind, unit, samples in document:
            family = Metric(_text(name), _text(documentation), _text(kind), _text(unit))
            for sample_name, labels, value, timestamp in samples:
                if not isinstance(labels, dict):
                    raise TypeError(f"labels {labels!r} are not an object")
                family.add_sample(
                    _text(sample_name),
                    {_text(key): _text(text) for key, text in labels.items()} | {WORKER_LABEL: label},
                    float(value),
                    None if timestamp is None else float(timestamp),
                )
            found.append(family)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not a worker's metric families: {e}") from None
    return found


def _text(value: object) -> str:
    """
    C{value}, which must be a string (a part of L{decode_families}' JSON).

    @raise TypeError: it is not.
    """
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


class OwnMetrics(Resource):
    """
    A worker's own series (C{registry}'s metric families, as JSON:
    L{encode_families}), on its private socket only: C{GET} and C{HEAD}.
    Never its siblings': the scrape that reads it is already fanning out.
    """

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render(self, request: Request) -> bytes:
        if request.method not in (b"GET", b"HEAD"):
            request.setResponseCode(405)
            request.setHeader(b"allow", b"GET, HEAD")
            return b""
        request.setHeader(b"content-type", b"application/json")
        return head_or_body(request, encode_families(self._registry))


@implementer(IAgentEndpointFactory)
@attrs.frozen
class _SocketOf:
    """
    The endpoint of every request of one sibling's agent: its socket.
    """

    reactor: IReactorUNIX
    path: Path
    timeout: float

    def endpointForURI(self, uri: object) -> IStreamClientEndpoint:
        endpoint: IStreamClientEndpoint = UNIXClientEndpoint(self.reactor, str(self.path), timeout=self.timeout)
        return endpoint


class _Families:
    """
    A collector of metric families already made (for L{generate_latest}).
    """

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


class WorkersExposition:
    """
    The exposition worker C{index} answers a C{/metrics} scrape with under
    C{--workers}: its own series and each sibling's, read over the
    siblings' private sockets (C{sockets}) in parallel, each series
    labelled C{worker="<index>"} (L{WORKER_LABEL}); plus
    C{openclaw_workers_scraped} and C{openclaw_workers}, without that
    label.

    Registers C{openclaw_worker_scrape_failures_total{sibling}} in
    C{registry} (the worker's own: exported with its C{worker} label),
    every sibling's series at 0 from the start.

    @param reactor: UNIX sockets to the siblings, and the timeout of their
        answers.
    @param timeout: how long each sibling's answer is waited for, in
        seconds.
    """

    def __init__(
        self,
        reactor: IClientReactor,
        registry: CollectorRegistry,
        sockets: WorkerSockets,
        index: int,
        timeout: float = SIBLING_SCRAPE_TIMEOUT_SECONDS,
    ) -> None:
        self._reactor = reactor
        self._registry = registry
        self.sockets = sockets
        self.index = index
        self.timeout = timeout
        self.siblings = [sibling for sibling in range(sockets.count) if sibling != index]
        failures = Counter(
            "openclaw_worker_scrape_failures",
            "Scrapes of /metrics this worker answered without a sibling's series (no answer within "
            f"{timeout:g} s), by sibling",
            ["sibling"],
            registry=registry,
        )
        self._failures = {sibling: failures.labels(str(sibling)) for sibling in self.siblings}
        self._agents = {
            sibling: Agent.usingEndpointFactory(reactor, _SocketOf(reactor, sockets.path(sibling), timeout))
            for sibling in self.siblings
        }
        #: Sibling -> when (reactor seconds) its absence was last logged.
        self._logged: dict[int, float] = {}
        #: The siblings' read in progress, if one is: the scrapes that come
        #: meanwhile wait for it.
        self._reading: InFlight[bytes] | None = None

    def exposition(self) -> Deferred[bytes]:
        """
        Every worker's series that could be read, in the Prometheus text
        format (C{CONTENT_TYPE_LATEST}); never fails for a sibling's sake.
        """
        reading = self._reading
        if reading is None:
            # Scrapes that come while the siblings are being read share
            # that read: one connection per sibling, however many scrape.
            reading = self._reading = InFlight()
            reads = [self._read(sibling) for sibling in self.siblings]
            gatherResults(reads).addCallback(self._merged).addBoth(self._answer_waiting, reading)
        return reading.observe()

    def _answer_waiting(self, result: bytes | Failure, reading: InFlight[bytes]) -> None:
        if self._reading is reading:
            self._reading = None
        reading.end(result)

    def _read(self, sibling: int) -> Deferred[tuple[int, list[Metric] | None]]:
        """
        C{sibling}'s metric families, or L{None} when it did not answer
        within L{timeout} (counted and logged: L{_missed}).
        """
        reading: Deferred[IResponse] = self._agents[sibling].request(b"GET", b"http://localhost/metrics")
        found: Deferred[list[Metric]] = reading.addCallback(_body).addCallback(decode_families, sibling)
        found.addTimeout(self.timeout, self._reactor, onTimeoutCancel=_no_answer)

        def read(found: list[Metric]) -> tuple[int, list[Metric] | None]:
            return sibling, found

        def missed(reason: Failure) -> tuple[int, list[Metric] | None]:
            self._missed(sibling, reason)
            return sibling, None

        return found.addCallbacks(read, missed)

    def _missed(self, sibling: int, reason: Failure) -> None:
        self._failures[sibling].inc()
        now = self._reactor.seconds()
        last = self._logged.get(sibling)
        if last is not None and now - last < FAILURE_LOG_SECONDS:
            return
        self._logged[sibling] = now
        _log.warn(
            "worker {sibling}'s series are left out of the scrapes this worker ({index}) answers: its metrics "
            "socket {path} could not be read within {timeout:g} s ({error}); each such scrape is counted in "
            "openclaw_worker_scrape_failures_total, and said here at most once a minute per worker.  A worker "
            "starting, or started again, is missing for a moment; if it lasts, see worker {sibling}'s lines in the log",
            sibling=sibling,
            path=str(self.sockets.path(sibling)),
            timeout=self.timeout,
            error=_why(reason),
            index=self.index,
        )

    def _merged(self, read: list[tuple[int, list[Metric] | None]]) -> bytes:
        # Its own series last: the failures just counted are in them.
        own = decode_families(encode_families(self._registry), self.index)
        workers = sorted([(self.index, own), *((sibling, found) for sibling, found in read if found is not None)])
        merged: dict[str, Metric] = {}
        for _, found in workers:
            for family in found:
                into = merged.setdefault(family.name, family)
                if into is not family:
                    for sample in family.samples:
                        into.add_sample(sample.name, sample.labels, sample.value, sample.timestamp)
        scraped = GaugeMetricFamily(
            "openclaw_workers_scraped",
            "How many workers' series this scrape holds (fewer than openclaw_workers: some did not answer in time)",
            value=len(workers),
        )
        running = GaugeMetricFamily("openclaw_workers", "The gateway's workers (--workers)", value=self.sockets.count)
        return generate_latest(_Families([*merged.values(), scraped, running]))


def _no_answer(result: object, timeout: float) -> Failure:
    """
    A sibling's read cancelled for its timeout: whatever the cancel made
    of it (Twisted's Agent wraps it in C{ResponseNeverReceived}), a
    C{TimeoutError}.
    """
    return Failure(DeferredTimeoutError(timeout, "no answer in time"))


def _why(reason: Failure) -> str:
    """
    Why a sibling's read failed, for the log: C{no answer in time}, else
    the error's message, else its type's name.
    """
    if reason.check(DeferredTimeoutError):
        return "no answer in time"
    failed = reason.value
    if isinstance(failed, ResponseFailed):
        # Twisted's Agent: the failures (a refused or dropped connection)
        # are in its reasons.
        causes = [_why(cause) for cause in failed.reasons if isinstance(cause, Failure)]
        if causes:
            return "; ".join(causes)
    return reason.getErrorMessage() or getattr(reason.type, "__name__", "error")


def _body(response: IResponse) -> Deferred[bytes]:
    """
    The body of a sibling's answer, which must be a 200; cancelling the
    result closes the connection, headers in or not
    (L{openclaw.providers.fetch.read_body}, bounded too).
    """
    body = read_body(response)
    if response.code == 200:
        return body

    def refused(_: bytes) -> bytes:
        raise ValueError(f"answered {response.code}, not 200")

    return body.addCallback(refused)
