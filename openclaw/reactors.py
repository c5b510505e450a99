"""
The reactor interfaces each long-lived object uses, combined, as Twisted
types a reactor that must provide several (C{IDistTrialReactor} in
C{twisted.trial._dist.disttrial}): a reactor is passed down, typed by what
it is asked to do, never imported globally.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.interfaces import (
    IReactorCore,
    IReactorFromThreads,
    IReactorPluggableNameResolver,
    IReactorProcess,
    IReactorSocket,
    IReactorTCP,
    IReactorThreads,
    IReactorTime,
    IReactorUNIX,
)
from zope.interface import Interface


class IStoreReactor(IReactorCore, IReactorTime, IReactorThreads):
    """
    What L{openclaw.consumers.store.ConsumerStore} asks of its reactor:
    the database pool's threads and shutdown trigger (C{IReactorThreads},
    C{IReactorCore}) and the timeout of a close (C{IReactorTime}).
    """


class IWriterReactor(IReactorTime, IReactorFromThreads):
    """
    What L{openclaw.writer.FileWriter} asks of its reactor: its jobs'
    results back from its thread (C{IReactorFromThreads}) and the clock of
    the stop's lines while it waits for them (C{IReactorTime}).
    """


class IClientReactor(IReactorTCP, IReactorUNIX, IReactorTime, IReactorPluggableNameResolver):
    """
    What a client endpoint of a URL asks of its reactor (the cluster
    store's C{REDIS_URL}, C{openclawctl}'s gateway): a host name's
    addresses tried over TCP with C{HostnameEndpoint} (C{IReactorTCP},
    C{IReactorTime}, C{IReactorPluggableNameResolver}), or a UNIX socket
    (C{IReactorUNIX}).
    """


class IGatewayReactor(IStoreReactor, IClientReactor, IWriterReactor):
    """
    What L{openclaw.service.GatewayService} asks of its reactor: timers,
    C{stop} on a fatal cluster error, what its consumer store asks and
    what its cluster store asks (L{IClientReactor}).
    """


class IUpstreamReactor(IReactorTCP, IReactorTime):
    """
    What L{openclaw.testing.upstream.StandInUpstream} asks of its reactor:
    a TCP port to listen on, and timers (an answer's delay, a stream's
    chunk interval, a stalled body's end).
    """


class IStandInReactor(IUpstreamReactor, IReactorCore):
    """
    What the stand-in upstream's command line
    (L{openclaw.testing.upstream.main}) asks of its reactor: what the
    stand-in asks, and the shutdown trigger that stops it.
    """


class ISupervisorReactor(IReactorCore, IReactorProcess, IReactorTime):
    """
    What L{openclaw.cluster.workers.WorkerSupervisor} asks of its reactor:
    spawning workers and timing their restarts and stop, and stopping
    (a worker of another installation, L{openclaw.cluster.workers.InstalledAgain}).
    """


class ITapReactor(IGatewayReactor, ISupervisorReactor, IReactorSocket):
    """
    What L{openclaw.tap.makeService} asks of its reactor: what the
    gateway asks (L{IGatewayReactor}), what C{--workers}' supervisor asks
    (L{ISupervisorReactor}), and a worker's listening on the socket its
    supervisor bound (C{IReactorSocket}, C{adoptStreamPort}).
    """


def _check(reactor: object, interface: type[Interface]) -> None:
    # A reactor provides Twisted's interfaces, not our combinations of them:
    # each one combined is checked.
    lacking = [
        base.__name__
        for base in interface.__iro__
        if base.__module__ == IReactorCore.__module__ and not base.providedBy(reactor)
    ]
    if lacking:
        raise TypeError(f"the reactor {reactor!r} does not provide {', '.join(lacking)}; run under a full reactor")


def tap_reactor(reactor: object) -> ITapReactor:
    """
    C{reactor}, checked to provide every interface of L{ITapReactor}.

    @raise TypeError: it lacks one (named).
    """
    _check(reactor, ITapReactor)
    return cast(ITapReactor, reactor)
