"""
A provider's API keys (L{KeyPool}): calls spread over them round robin; a
key answered with 429 rests for a while, a key refused as invalid is set
aside until a health check finds it good again.

Keys never leave this object in clear: logs, metrics and reports name
them by L{fingerprint}.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable

import attrs
from twisted.logger import Logger

from openclaw.routing import FallbackReason

#: How long a key answered with 429 rests when the provider said nothing
#: (no C{Retry-After}, no wait in its error body), in seconds.
DEFAULT_REST_SECONDS = 10.0


def fingerprint(key: str) -> str:
    """
    The first 8 hex digits of the key's SHA-256: enough to tell the keys of
    one pool apart in a log, useless to anyone who would call with it.
    """
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def merge_keys(*groups: Iterable[str]) -> tuple[str, ...]:
    """
    The keys of every group in order, each once, blanks dropped.
    """
    return tuple(dict.fromkeys(key.strip() for group in groups for key in group if key.strip()))


@attrs.define(eq=False)
class KeyPool:
    """
    The keys of one provider, and which of them may be used now.

    Plain object, time read from C{clock} (C{reactor.seconds}; a
    L{twisted.internet.task.Clock} in tests).
    """

    keys: tuple[str, ...] = attrs.field(repr=False)
    clock: Callable[[], float] = attrs.field(repr=False)
    #: Provider id, for log lines.
    provider: str = "-"
    _next: int = attrs.field(default=0, init=False, repr=False)
    #: Key -> time it may be used again (after a 429).
    _resting: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)
    #: Keys refused as invalid, until a health check finds them good.
    _set_aside: set[str] = attrs.field(factory=set, init=False, repr=False)

    #: Told (fingerprint, seconds) of every rest this pool decides, so a
    #: cluster can share it (L{openclaw.cluster.node.ClusterNode.rest}).
    on_rest: Callable[[str, str, float], None] | None = attrs.field(default=None, repr=False)

    _log = Logger()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def usable(self, key: str) -> bool:
        """
        Whether C{key} may be tried now: neither set aside (refused) nor
        resting (rate limited, until its rest ends on L{clock}).
        """
        if key in self._set_aside:
            return False
        resting = self._resting.get(key)
        return resting is None or resting <= self.clock()

    def pick(self, avoid: Collection[str] = ()) -> str | None:
        """
        The next usable key, round robin, other than those in C{avoid};
        None when none is.
        """
        count = len(self.keys)
        for step in range(count):
            index = (self._next + step) % count
            key = self.keys[index]
            if key not in avoid and self.usable(key):
                self._next = (index + 1) % count
                return key
        return None

    @property
    def available(self) -> int:
        """
        How many keys may be used now.
        """
        return sum(1 for key in self.keys if self.usable(key))

    def rest(self, key: str, seconds: float | None = None) -> None:
        """
        Leave C{key} unused for C{seconds} (the provider's C{Retry-After};
        L{DEFAULT_REST_SECONDS} when it gave none).
        """
        seconds = DEFAULT_REST_SECONDS if seconds is None else seconds
        self._resting[key] = self.clock() + seconds
        self._log.info(
            "{provider} key {key} rate limited; resting {seconds:g} s",
            provider=self.provider,
            key=fingerprint(key),
            seconds=seconds,
        )
        if self.on_rest is not None:
            self.on_rest(self.provider, fingerprint(key), seconds)

    def rest_shared(self, key_fingerprint: str, seconds: float) -> None:
        """
        Another instance of the cluster rested the key with this
        fingerprint for C{seconds}: rest it here too (not told on).  Logged
        only when that rests it longer than it rested here by a second or
        more (the cluster's rests are read again after a reconnection and
        when a heartbeat finds some changed: the ones known are not news).
        """
        for key in self.keys:
            if fingerprint(key) == key_fingerprint:
                known = self._resting.get(key, 0.0)
                self._resting[key] = max(known, self.clock() + seconds)
                if self._resting[key] < known + 1.0:
                    continue
                self._log.info(
                    "{provider} key {key} resting {seconds:g} s (rate limited on another instance)",
                    provider=self.provider,
                    key=key_fingerprint,
                    seconds=seconds,
                )

    def set_aside(self, key: str) -> None:
        """
        Stop using C{key} until L{restore}d (a health check that finds it
        good).
        """
        if key not in self._set_aside:
            self._set_aside.add(key)
            self._log.warn(
                "{provider} key {key} refused by the provider; set aside until a health_check finds it good",
                provider=self.provider,
                key=fingerprint(key),
            )

    def restore(self, key: str) -> None:
        """
        C{key} works again (a health check listed models with it).
        """
        if key in self._set_aside:
            self._set_aside.discard(key)
            self._log.info("{provider} key {key} works again", provider=self.provider, key=fingerprint(key))

    def unusable_reason(self) -> FallbackReason:
        """
        Why no key may be used now, as a reason label of
        C{openclaw_api_fallbacks_total}: C{"rate_limited"} while a key rests
        after a 429, C{"auth"} when every key is set aside, else
        C{"no_key"}.
        """
        if self.back_in() is not None:
            return "rate_limited"
        if self.keys and self._set_aside.issuperset(self.keys):
            return "auth"
        return "no_key"

    def back_in(self) -> float | None:
        """
        Seconds until the first resting key may be used again; None when no
        key rests (or every unusable key is set aside).
        """
        now = self.clock()
        waits = [until - now for key, until in self._resting.items() if key not in self._set_aside and until > now]
        return min(waits) if waits else None

    def states(self) -> dict[str, str]:
        """
        Fingerprint -> C{"ok"}, C{"resting"} or C{"set_aside"}, in order.
        """
        now = self.clock()
        return {
            fingerprint(key): "set_aside"
            if key in self._set_aside
            else "resting"
            if self._resting.get(key, 0.0) > now
            else "ok"
            for key in self.keys
        }


__all__ = ["DEFAULT_REST_SECONDS", "KeyPool", "fingerprint", "merge_keys"]
