"""
The consumers' database while the gateway runs (L{ConsumersService}): opened,
brought up to date and loaded at start (tried again while it cannot be
used), its usage rows older than C{USAGE_RETENTION_DAYS} purged hourly
(L{UsagePurge}), its SQLite file watched, and at stop the rows still
pending written and the database closed within C{SHUTDOWN_GRACE_SECONDS}.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import (
    Deferred,
    inlineCallbacks,
    maybeDeferred,
    succeed,
)
from twisted.internet.interfaces import (
    IReactorTime,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from openclaw.consumers.shared import SharedConsumers
from openclaw.consumers.store import (
    APPLICATION_PREFIX,
    DATABASE_FILE_LOST,
    DATABASE_RESCUED,
    RESCUED_INFIX,
    RETRY_MAX_SECONDS,
    ConsumerStore,
    DatabaseFileLost,
    Retrying,
    UnusableDatabaseFile,
    database_error,
    log_database_failure,
    sqlite_file,
    sqlite_path,
)
from openclaw.consumers.table import ConsumerTable
from openclaw.files import FILES_CHECK_SECONDS
from openclaw.loops import LoggedStep
from openclaw.reactors import IGatewayReactor
from openclaw.settings import Settings
from openclaw.stalls import boot_clock
from openclaw.timefmt import compact, isoformat
from openclaw.urls import masked_url

#: At stop, the least time the usage rows' last write, then the closing of
#: the consumers' database, each get when SHUTDOWN_GRACE_SECONDS is spent
#: already, in seconds.
CONSUMERS_STOP_MIN_SECONDS = 1.0

#: How often the usage rows older than USAGE_RETENTION_DAYS are deleted, in
#: seconds.
USAGE_PURGE_SECONDS = 3600.0

#: The longest wait before a failed copy of a lost database is tried again
#: (L{ConsumersService.check_database_file}), in seconds.
MAX_RESCUE_WAIT_SECONDS = 64.0


def warn_rescued_copies(database: Path, consumers: int, log: Logger) -> None:
    """
    At start, warn of the copies beside the consumers' SQLite C{database}
    that a gateway made of it when its file was lost
    (L{ConsumerStore.rescue <openclaw.consumers.store.ConsumerStore.rescue>},
    C{openclaw.db.rescued-<time>}), the newest named: one started without
    the copy moved back (a restart by systemd, a reboot) has a new, empty
    database, and nothing else would say where the consumers went.
    """
    copies = sorted(database.parent.glob(f"{database.name}{RESCUED_INFIX}*"))
    if not copies:
        return
    log.warn(
        "{count} cop{ies} of the consumers' database made when its file was lost {are} beside it, the newest "
        "{newest}; this database holds {consumers} consumer(s): if the copy is what it should hold, stop the "
        "gateway, run: mv {newest} {database}, and start it; otherwise remove the copies",
        count=len(copies),
        ies="y" if len(copies) == 1 else "ies",
        are="is" if len(copies) == 1 else "are",
        newest=shlex.quote(str(copies[-1])),
        database=shlex.quote(str(database)),
        consumers=consumers,
    )


#: How far the wall clock may run ahead of the monotonic clock between two
#: purges of the usage rows (or the start and the first) before the purge
#: goes by the monotonic clock instead (L{UsagePurge}), in seconds; and how
#: far ahead of the clock the newest usage row may be dated at start
#: before the clock is said to be behind (L{check_usage_dates}).
CLOCK_STEP_SECONDS = 3600.0


def _duration(seconds: float) -> str:
    """
    C{seconds} for a log line: C{"400.0 days"}, C{"2.5 h"}, C{"90 s"}.
    """
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:.1f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"


class UsagePurge:
    """
    One purge of the usage rows older than USAGE_RETENTION_DAYS, called
    every L{USAGE_PURGE_SECONDS} (L{usage_purger}); fires with L{None},
    never fails (a purge that fails is logged, and the next one tries
    again).  A purge that deletes rows says how many and the cutoff.

    The rows' C{ts} are the wall clock's, and so is the cutoff, unless
    the wall clock has run more than L{CLOCK_STEP_SECONDS} ahead of the
    monotonic clock since the last purge (or the start): set forward by
    hand or by NTP (the host's suspension is not: the clock compared is
    L{boot_clock}, which goes on meanwhile).  A purge by that clock would delete every row
    younger than USAGE_RETENTION_DAYS by the real time (all of
    them, with no word).  The cutoff then goes by the monotonic clock
    (the last purge's time plus the monotonic seconds since), and one
    warning says so and what to do; once the two clocks agree again (the
    wall clock set right) the purge follows the wall clock again, and
    says so (but Twisted's timers go by the wall clock: one set back holds
    the next purge until it reads again the time it read when set
    forward, so the warning says to restart the gateway).  So no row is deleted before it is USAGE_RETENTION_DAYS old
    by the monotonic clock (for rows dated by a clock right when they were
    written); a wall clock set forward because it was behind (right now)
    makes the rows be kept that much longer, until the gateway restarts.

    A wall clock that was already far ahead when the gateway started is
    not seen so: nothing on the host tells it from a long pause of the
    gateway's use.
    """

    def __init__(
        self,
        store: ConsumerStore,
        clock: IReactorTime,
        retention_seconds: float,
        where: str,
        log: Logger,
        monotonic: Callable[[], float] = boot_clock,
    ) -> None:
        """
        @param clock: the wall clock (POSIX seconds; the reactor's).
        @param retention_seconds: USAGE_RETENTION_DAYS, in seconds.
        @param where: the database, as the operator knows it (for the log).
        @param monotonic: the monotonic clock, in seconds (L{boot_clock}).
        """
        self._store = store
        self._clock = clock
        self._retention = retention_seconds
        self._where = where
        self._log = log
        self._monotonic = monotonic
        #: The time the last purge (or the start) went by, wall clock's
        #: seconds, and the monotonic clock then.
        self._last = (clock.seconds(), monotonic())
        #: Whether the purges go by the monotonic clock (the wall clock ran
        #: ahead of it).
        self._by_monotonic = False

    def __call__(self) -> Deferred[None]:
        wall = self._clock.seconds()
        monotonic = self._monotonic()
        last, last_monotonic = self._last
        elapsed = monotonic - last_monotonic
        expected = last + elapsed
        ahead = wall - expected
        if ahead > CLOCK_STEP_SECONDS:
            now = expected
            if not self._by_monotonic:
                self._log.warn(
                    "the wall clock ran {ahead} ahead of the monotonic clock in the {elapsed} since the last purge "
                    "of the usage rows (it was set forward, by hand or by NTP; it reads "
                    "{wall}): the usage rows are purged by the monotonic clock from now on (those dated before "
                    "{cutoff}), not by the wall clock, which would delete rows younger than USAGE_RETENTION_DAYS; "
                    "set the host's clock right (NTP), then restart the gateway: the purge follows the wall clock "
                    "again once the two agree, but the gateway's timers go by the wall clock, and one set back "
                    "holds them (this purge's included) until it reads {wall} again; if the wall clock is right "
                    "now (it was behind), restart the gateway as well, to purge by it (until then the usage rows "
                    "are kept {ahead} longer)",
                    ahead=_duration(ahead),
                    elapsed=_duration(max(elapsed, 0.0)),
                    wall=isoformat(wall),
                    cutoff=isoformat(now - self._retention),
                    ahead_seconds=round(ahead, 3),
                )
            self._by_monotonic = True
        else:
            now = wall
            if self._by_monotonic:
                self._log.info(
                    "the wall clock agrees with the monotonic clock again (it reads {wall}): the usage rows are "
                    "purged by it again",
                    wall=isoformat(wall),
                )
            self._by_monotonic = False
        self._last = (now, monotonic)
        cutoff = now - self._retention

        def purged(count: int) -> None:
            if count:
                self._log.info(
                    "deleted {count} usage row(s) dated before {cutoff} (older than USAGE_RETENTION_DAYS) "
                    "from the consumers' database {where}",
                    count=count,
                    cutoff=isoformat(cutoff),
                    where=self._where,
                )

        def failed(reason: Failure) -> None:
            log_database_failure(
                self._log,
                "could not delete the usage rows older than USAGE_RETENTION_DAYS from the consumers' "
                "database {where} ({error}); trying again in {seconds} s: check that the database is reachable "
                "and not locked by another process",
                reason,
                where=self._where,
                seconds=USAGE_PURGE_SECONDS,
            )

        return maybeDeferred(self._store.purge, cutoff).addCallbacks(purged, failed)


def usage_purger(
    store: ConsumerStore,
    clock: IReactorTime,
    retention_seconds: float,
    where: str,
    log: Logger,
    monotonic: Callable[[], float] = boot_clock,
) -> LoopingCall:
    """
    A started L{LoopingCall} deleting, every L{USAGE_PURGE_SECONDS}, the
    usage rows older than C{retention_seconds} (USAGE_RETENTION_DAYS), by
    the wall clock C{clock} unless it ran ahead of the C{monotonic} clock
    (L{UsagePurge}).

    A purge that fails (SQLite's "database is locked", a PostgreSQL
    restarting) is logged and tried again at the next interval: a
    L{LoopingCall} whose call fails stops for good.

    @param where: the database, as the operator knows it (for the log).
    """
    purge = UsagePurge(store, clock, retention_seconds, where, log, monotonic)
    purger = LoopingCall(LoggedStep(purge, log, "the purge of old usage rows"))
    purger.clock = clock
    purger.start(USAGE_PURGE_SECONDS, now=False)
    return purger


#: How often the gateway looks again for other gateways on its PostgreSQL
#: database (L{SharingCheck}), in seconds: the one that started first
#: learns of a second within this.
SHARING_CHECK_SECONDS = 60.0


class SharingCheck:
    """
    Say, in one critical line, which other gateways use the same
    PostgreSQL database as this one where they must not
    (L{ConsumerStore.gateways_sharing}): a gateway without C{REDIS_URL}
    beside any other, or instances of other clusters.  Each loads the
    consumers and keys once and hears of no change the others make: a key
    revoked on one is still served by the other until it restarts
    (consumers trial s45).  Run at start and every
    L{SHARING_CHECK_SECONDS}; said again only when a gateway not said
    before appears, and a failed read once until one succeeds (warn).
    Each call fires with L{None}, never fails.

    @param where: the database, as the operator knows it (for the log).
    """

    def __init__(self, store: ConsumerStore, where: str, log: Logger) -> None:
        self._store = store
        self._where = where
        self._log = log
        #: The other gateways' connections said so far.
        self._said: set[str] = set()
        self._failing = False

    def __call__(self) -> Deferred[None]:
        return maybeDeferred(self._store.gateways_sharing).addCallbacks(self._checked, self._failed)

    def _checked(self, others: list[str]) -> None:
        self._failing = False
        if not set(others) - self._said:
            return
        self._said.update(others)
        self._log.critical(
            "the consumers' database {where} is used by other gateways as well: {others} (their PostgreSQL "
            "connections' application_name), where {role}; each holds its own copy of the consumers and "
            "keys, so a key revoked or a consumer changed on one is still served the old way by the "
            "others until they restart: give each gateway (or each cluster) its own DATABASE_URL, or "
            "make them one cluster (the same REDIS_URL and CLUSTER_NAME)",
            where=self._where,
            others=", ".join(others),
            role=(
                "this gateway, without REDIS_URL, shares it with no other"
                if (self._store.application_name or "").startswith(APPLICATION_PREFIX + "standalone ")
                else "a cluster shares it with no gateway outside it"
            ),
        )

    def _failed(self, reason: Failure) -> None:
        if self._failing:
            return
        self._failing = True
        log_database_failure(
            self._log,
            "could not check which other gateways use the consumers' database {where} ({error}): {advice}",
            reason,
            LogLevel.warn,
            where=self._where,
        )


def check_usage_dates(store: ConsumerStore, clock: IReactorTime, where: str, log: Logger) -> Deferred[None]:
    """
    Warn once when usage rows are dated more than L{CLOCK_STEP_SECONDS}
    after the wall clock C{clock}: the clock is behind (a host started
    without a working real-time clock, or one set back).  Reads the rows
    after that time only (an index's range: none, as a rule).  Fires with
    L{None}, never fails (a failed read is logged, at warn).

    @param where: the database, as the operator knows it (for the log).
    """
    now = clock.seconds()

    def checked(days: list[dict[str, Any]]) -> None:
        if not days:
            return
        log.warn(
            "this host's clock reads {now}, but usage rows of {requests} request(s) in the consumers' database "
            "{where} are dated more than {ahead} later, up to {day}: either the clock is behind (a host started "
            "without a working real-time clock, or a clock set back): set it right (NTP), rows are dated by it; or "
            "they were dated while the clock was ahead, and it is right now: nothing to do, but this is said at each "
            "start until {day}",
            now=isoformat(now),
            requests=sum(int(day["requests"]) + int(day["limited"]) for day in days),
            where=where,
            ahead=_duration(CLOCK_STEP_SECONDS),
            day=days[-1]["day"],
        )

    def failed(reason: Failure) -> None:
        log_database_failure(
            log,
            "could not compare the usage rows' dates with this host's clock in the consumers' database {where} "
            "({error}): {advice}",
            reason,
            LogLevel.warn,
            where=where,
        )

    return maybeDeferred(store.usage, None, now + CLOCK_STEP_SECONDS, None, "day").addCallbacks(checked, failed)


def unusable_database_file(settings: Settings) -> str | None:
    """
    Why the consumers' SQLite file in C{STATE_DIR} (C{DATABASE_URL}
    unset) cannot be used (L{sqlite_file}, which makes it, private, when
    missing: a directory in the way, permission denied), as a refusal to
    start says it, with what to do; None when it can, or C{DATABASE_URL}
    is set.  Both C{twistd openclaw}'s check before daemonizing
    (L{openclaw.tap.makeService}) and the service's at start say it so.
    """
    if settings.database_url:
        return None
    try:
        sqlite_file(settings.state_dir)
    except UnusableDatabaseFile as e:
        named = settings.named("STATE_DIR", "--state-dir", str(settings.state_dir))
        return f"{named}: {e}; or point STATE_DIR / --state-dir at another directory"
    return None


class ConsumersService(Service):
    """
    The consumers' database while running: at start its pool of
    connections made (L{ConsumerStore.start}: adbapi's threads start with
    it, not before, and its reactor triggers are asked for then), its
    schema brought up to date and the table loaded (tried again with
    back-off while the database cannot be used: L{Retrying}), the usage
    writer started, and the usage rows older than USAGE_RETENTION_DAYS
    purged hourly (L{usage_purger}); at stop the purge and the
    reconciliations of a cluster's consumers stopped, the usage rows still
    pending written, then the pool closed (its threads joined, its
    reactor trigger taken back), by the end of SHUTDOWN_GRACE_SECONDS
    (L{stopService}).

    @ivar ready: fires once the consumers are loaded (or the first attempt
        failed: L{Retrying} goes on trying).
    """

    def __init__(
        self,
        store: ConsumerStore,
        table: ConsumerTable,
        shared: SharedConsumers | None,
        settings: Settings,
        reactor: IGatewayReactor,
        log: Logger,
        deadline: Callable[[], float],
        monotonic: Callable[[], float] = boot_clock,
        identified: Callable[[str, str], None] = lambda identity, where: None,
    ) -> None:
        """
        @param store: the consumers' store, its pool not made yet
            (C{ConsumerStore.open}'s C{start=False}): made at
            L{startService}.
        @param log: the gateway's logger (its lines are the gateway's).
        @param deadline: when the gateway's stop must be over (the end of
            SHUTDOWN_GRACE_SECONDS since it began), in the reactor's
            seconds; read at stop.
        @param monotonic: the monotonic clock, in seconds, against which
            the purge checks the reactor's wall clock (L{UsagePurge}).
        @param identified: in a cluster on PostgreSQL, called with the
            database's identity (L{ConsumerStore.identity}) and where it is
            (for the log) once it is loaded: the cluster compares its
            instances' (L{openclaw.cluster.node.ClusterNode.consumers_database}).
        """
        self._store = store
        self._identified = identified
        self._table = table
        self._shared = shared
        self._settings = settings
        self._reactor = reactor
        self._log = log
        self._deadline = deadline
        self._monotonic = monotonic
        #: A rescue copy failed and was said (L{check_database_file}): not again.
        self._rescue_failed = False
        #: When a failed rescue copy is tried again, and the wait before it.
        self._rescue_next = 0.0
        self._rescue_wait = FILES_CHECK_SECONDS / 2
        self._purger: LoopingCall | None = None
        self._sharing: LoopingCall | None = None
        self._checking: LoopingCall | None = None
        self._opening: Retrying[int] | None = None
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        """
        Make the consumers' pool of connections (its threads start now, or
        once the reactor runs), bring the database up to date, load the
        table, and start the usage writer and the purge of rows older than
        USAGE_RETENTION_DAYS (hourly).
        """
        super().startService()
        self._store.start()
        if self._store.database_path is not None:
            checking = self._checking = LoopingCall(
                LoggedStep(
                    self.check_database_file, self._log, "the check that the consumers' database is in STATE_DIR"
                )
            )
            checking.clock = self._reactor
            checking.start(FILES_CHECK_SECONDS, now=False)
        settings = self._settings
        # Named as the operator wrote it (its password masked): an instance
        # of a cluster pointed at another database by a typo loads its
        # consumers from it, and this names which (not
        # "0 consumer(s) loaded" alone, then 401 for every cluster key).
        where = (
            f"{masked_url(settings.database_url)} (DATABASE_URL)"
            if settings.database_url
            else str(sqlite_path(settings.state_dir))
        )

        def attempt() -> Deferred[int]:
            def migrated(version: int) -> Deferred[int]:
                return self._table.reload().addCallback(lambda _: version)

            return self._store.migrate().addCallback(migrated)

        def loaded(version: int, failures: int) -> None:
            self._log.info("consumers' database {where} at schema version {version}", where=where, version=version)
            if failures:
                self._log.info(
                    "{count} consumer(s) loaded (the database answered after {failures} failed attempt(s))",
                    count=len(self._table.consumers),
                    failures=failures,
                )
            else:
                self._log.info("{count} consumer(s) loaded", count=len(self._table.consumers))
            if self._shared is not None:
                self._shared.loaded()
            if not self.ready.called:
                self.ready.callback(None)
            check_usage_dates(self._store, self._reactor, where, self._log)
            self._check_sharing(where)
            if self._shared is not None:
                self._identify(where)
            if not settings.database_url:
                warn_rescued_copies(sqlite_path(settings.state_dir), len(self._table.consumers), self._log)

        def failed(reason: Failure, failures: int, delay: float) -> None:
            # Once per outage: the retries after it say nothing until one
            # succeeds.
            if failures == 1:
                log_database_failure(
                    self._log,
                    "the consumers' database {where} cannot be used ({error}): consumer keys are refused (503) "
                    "and the consumer commands answer 'not loaded yet' until it can; trying again with back-off "
                    "(every {cap:.0f} s at most): {advice}",
                    reason,
                    where=where,
                    cap=RETRY_MAX_SECONDS,
                )
                self.ready.callback(None)

        self._opening = Retrying(attempt, self._reactor, failed, loaded)
        self._opening.start()
        self._table.start(self._reactor)
        self._purger = usage_purger(
            self._store, self._reactor, settings.usage_retention_days * 86400.0, where, self._log, self._monotonic
        )

    def _identify(self, where: str) -> None:
        """
        Tell the cluster which database this instance's consumers are in
        (L{ConsumerStore.identity}), for it to say when its instances use
        more than one (trial s46: a cluster key refused, 401, on the
        instance with another DATABASE_URL, and nothing said).
        """

        def known(identity: str | None) -> None:
            if identity is not None:
                self._identified(identity, where)

        def unknown(reason: Failure) -> None:
            self._log.info(
                "whether every instance of the cluster uses the consumers' database {where} is not checked: "
                "PostgreSQL would not give its identity ({error}; pg_control_system() is needed)",
                where=where,
                error=database_error(reason),
            )

        self._store.identity().addCallbacks(known, unknown)

    def _check_sharing(self, where: str) -> None:
        """
        On PostgreSQL, look for other gateways on the same database now
        and every L{SHARING_CHECK_SECONDS} (L{SharingCheck}); when
        C{DATABASE_URL} names the connections itself, say that nothing is
        checked.
        """
        store = self._store
        if store.dialect != "postgresql" or self._sharing is not None:
            return
        if store.application_name is None:
            self._log.info(
                "which other gateways use the consumers' database {where} is not checked: DATABASE_URL names its "
                "connections (application_name), so theirs are not told from this one's",
                where=where,
            )
            return
        sharing = self._sharing = LoopingCall(SharingCheck(store, where, self._log))
        sharing.clock = self._reactor
        sharing.start(SHARING_CHECK_SECONDS, now=True)

    def check_database_file(self) -> Deferred[None]:
        """
        Check that the consumers' SQLite database is still at its path
        (L{ConsumerStore.check_file}); the first time it is not, log one
        critical line that says what happened and what to do
        (L{DatabaseFileLost}), from then on the consumer commands' changes
        being refused; then copy what the gateway holds beside it
        (L{ConsumerStore.rescue}) and say where (L{DATABASE_RESCUED}).  A
        copy that cannot be made (a full disk, the usual company of files
        removed) is said once and tried again at each check until it is:
        the gateway may hold the only copy of every consumer and key.
        """
        store = self._store

        def rescue() -> Deferred[None]:
            when = compact(self._reactor.seconds())
            return store.rescue(when).addCallbacks(rescued, not_rescued)

        def checked(lost: DatabaseFileLost | None) -> Deferred[None] | None:
            if lost is None:
                return None
            self._log.critical(DATABASE_FILE_LOST, file=str(lost.path), path=str(lost.database), what=lost.what)
            return rescue()

        def rescued(copy: Path | None) -> Deferred[None] | None:
            if copy is None or store.database_path is None:
                return None
            self._log.critical(
                DATABASE_RESCUED, copy=shlex.quote(str(copy)), path=shlex.quote(str(store.database_path))
            )
            # The copy lacks the key revokes not saved, whose file may have
            # gone with the directory: kept again beside it, so that the
            # start on the copy refuses those keys and writes them.
            keeping = self._table.keep_revokes_again()
            return None if keeping is None else keeping.addCallback(revokes_kept)

        def revokes_kept(kept: bool) -> None:
            table = self._table
            path = None if table.revokes_file is None else str(table.revokes_file.path)
            self._log.emit(
                LogLevel.warn if kept else LogLevel.critical,
                "the copy lacks {count} key revoke(s) not saved to the database"
                + (
                    "; they are kept in {path}, so a start on the copy refuses those keys and writes the revokes"
                    if kept
                    else ", and they could not be kept in {path}: revoke those keys again after the restart "
                    "(consumer_list shows each under revokes_unsaved)"
                ),
                count=len(set(table.revoking.values())),
                path=path,
            )

        def not_rescued(reason: Failure) -> None:
            if self._rescue_failed:
                return
            self._rescue_failed = True
            self._log.critical(
                "the consumers' database the gateway holds could not be copied beside where it was ({error}); "
                "the gateway tries again (every {interval:g} s, then less often): free space on (or make writable) the file system of "
                "STATE_DIR, or put the database back from a backup with the gateway stopped",
                error=reason.getErrorMessage(),
                interval=FILES_CHECK_SECONDS,
            )

        if store.lost is not None:
            if store.rescued is not None or self._reactor.seconds() < self._rescue_next:
                return succeed(None)
            # Each try copies the whole database on the store's one thread:
            # tried again after 2, 4, ... 64 s.
            self._rescue_wait = min(self._rescue_wait * 2, MAX_RESCUE_WAIT_SECONDS)
            self._rescue_next = self._reactor.seconds() + self._rescue_wait
            return rescue()
        return store.check_file().addCallback(checked)

    @inlineCallbacks
    def stopService(self) -> Any:
        """
        Stop the purge, a cluster's reconciliations and the retries of the
        consumers' database, write the usage rows still pending, and close
        the database, by the C{deadline} (each step gets at least
        L{CONSUMERS_STOP_MIN_SECONDS}): a database that does not answer
        must not keep the process from exiting.  What is given up is
        logged (the rows by L{ConsumerTable.stop}).  Never fails.
        """
        super().stopService()
        if self._purger is not None and self._purger.running:
            self._purger.stop()
        if self._sharing is not None and self._sharing.running:
            self._sharing.stop()
        if self._shared is not None:
            self._shared.stop()
        if self._opening is not None:
            self._opening.stop()
        if self._checking is not None and self._checking.running:
            self._checking.stop()
        deadline = self._deadline()

        def left() -> float:
            return max(deadline - self._reactor.seconds(), CONSUMERS_STOP_MIN_SECONDS)

        seconds = left()
        # The table's deadline is the only one: by then it has written the
        # rows or given them up (one line), and tries no more; only then
        # is the store closed.
        yield self._table.stop(self._reactor, self._reactor.seconds() + seconds)
        seconds = left()
        closed = yield self._store.close(seconds)
        if not closed:
            self._log.warn(
                "the consumers' database connections did not close within {seconds:.1f} s (a connection "
                "attempt or query still waiting on it): left to end with the process",
                seconds=seconds,
            )
