"""
A provider's API keys (L{KeyPool}): calls spread over them round robin; a
key answered with 429 rests for a while (for the model called only, where
the provider limits each model apart: L{KeyPool.rests_by_model}), a key
refused as invalid is set aside until a health check finds it good again.

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


def rest_subject(provider: str, model: str | None) -> str:
    """
    What a key's rest is for, as a cluster shares it: C{<provider>}, or
    C{<provider>/<model>} for a rest of one model's calls
    (L{KeyPool.rests_by_model}); read back by L{rest_scope}.  An instance
    of an earlier version takes the second for a provider it does not
    have, and leaves it.
    """
    return provider if model is None else f"{provider}/{model}"


def rest_scope(subject: str) -> tuple[str, str | None]:
    """
    The provider id and the model (None: every model) of a
    L{rest_subject}.
    """
    provider, slash, model = subject.partition("/")
    return provider, (model if slash else None)


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
    #: A 429 on a call of a model rests the key for that model only, not
    #: for the provider's other models: the provider limits each model
    #: apart (Gemini: "rate limits are applied per model",
    #: U{https://ai.google.dev/gemini-api/docs/rate-limits}), and a client
    #: naming a model of small quota must not keep the others from every
    #: client.  A 429 of no model's call (a models
    #: listing) rests the whole key.
    rests_by_model: bool = False
    _next: int = attrs.field(default=0, init=False, repr=False)
    #: Key -> time it may be used again (after a 429).
    _resting: dict[str, float] = attrs.field(factory=dict, init=False, repr=False)
    #: (key, model) -> time the key may be used again for that model
    #: (after a 429 of its call, L{rests_by_model}).
    _model_resting: dict[tuple[str, str], float] = attrs.field(factory=dict, init=False, repr=False)
    #: Keys refused as invalid, until a health check finds them good.
    _set_aside: set[str] = attrs.field(factory=set, init=False, repr=False)

    #: Told (provider id, fingerprint, seconds, model) of every rest this
    #: pool decides (model None: the whole key's), so a cluster can share
    #: it (L{openclaw.cluster.node.ClusterNode.rest}).
    on_rest: Callable[[str, str, float, str | None], None] | None = attrs.field(default=None, repr=False)

    _log = Logger()

    def __contains__(self, key: str) -> bool:
        return key in self.keys

    def usable(self, key: str, model: str | None = None) -> bool:
        """
        Whether C{key} may be tried now (for a call of C{model}): neither
        set aside (refused) nor resting (rate limited, until its rest ends
        on L{clock}; for C{model}, where rests are by model).
        """
        if key in self._set_aside:
            return False
        resting = self._resting.get(key)
        if resting is not None and resting > self.clock():
            return False
        if model is None or not self._model_resting:
            return True
        resting = self._model_resting.get((key, model))
        return resting is None or resting <= self.clock()

    def pick(self, avoid: Collection[str] = (), model: str | None = None) -> str | None:
        """
        The next usable key (for a call of C{model}), round robin, other
        than those in C{avoid}; None when none is.
        """
        count = len(self.keys)
        for step in range(count):
            index = (self._next + step) % count
            key = self.keys[index]
            if key not in avoid and self.usable(key, model):
                self._next = (index + 1) % count
                return key
        return None

    @property
    def available(self) -> int:
        """
        How many keys may be used now (for some model: none rests as a
        whole, nor is set aside).
        """
        return sum(1 for key in self.keys if self.usable(key))

    def available_for(self, model: str | None) -> int:
        """
        How many keys may be used now for a call of C{model}.
        """
        return sum(1 for key in self.keys if self.usable(key, model))

    def _scope(self, model: str | None) -> str | None:
        return model if self.rests_by_model else None

    def _forget_past_rests(self) -> None:
        """
        Drop the rests by model that are over: each is of a model a client
        named, so they must not pile up.
        """
        now = self.clock()
        for entry in [entry for entry, until in self._model_resting.items() if until <= now]:
            del self._model_resting[entry]

    def rest(self, key: str, seconds: float | None = None, model: str | None = None) -> None:
        """
        Leave C{key} unused for C{seconds} (the provider's C{Retry-After};
        L{DEFAULT_REST_SECONDS} when it gave none): for calls of C{model}
        only where rests are by model (L{rests_by_model}), else for all.
        """
        seconds = DEFAULT_REST_SECONDS if seconds is None else seconds
        scope = self._scope(model)
        if scope is None:
            self._resting[key] = self.clock() + seconds
        else:
            self._forget_past_rests()
            self._model_resting[key, scope] = self.clock() + seconds
        self._log.info(
            "{provider} key {key} rate limited{scope}; resting {seconds:g} s",
            provider=self.provider,
            key=fingerprint(key),
            scope="" if scope is None else f" for {scope}",
            seconds=seconds,
            model=scope,
        )
        if self.on_rest is not None:
            self.on_rest(self.provider, fingerprint(key), seconds, scope)

    def rest_shared(self, key_fingerprint: str, seconds: float, model: str | None = None) -> None:
        """
        Another instance of the cluster rested the key with this
        fingerprint for C{seconds} (for calls of C{model}; None: for all):
        rest it here too (not told on).  Logged only when that rests it
        longer than it rested here by a second or more (the cluster's rests
        are read again after a reconnection and when a heartbeat finds some
        changed: the ones known are not news).  A model's rest is taken as
        the whole key's by a pool whose rests are not by model.
        """
        scope = self._scope(model)
        for key in self.keys:
            if fingerprint(key) != key_fingerprint:
                continue
            until = self.clock() + seconds
            if scope is None:
                known = self._resting.get(key, 0.0)
                self._resting[key] = max(known, until)
            else:
                self._forget_past_rests()
                known = self._model_resting.get((key, scope), 0.0)
                self._model_resting[key, scope] = max(known, until)
            if until < known + 1.0:
                continue
            self._log.info(
                "{provider} key {key} resting {seconds:g} s{scope} (rate limited on another instance)",
                provider=self.provider,
                key=key_fingerprint,
                seconds=seconds,
                scope="" if scope is None else f" for {scope}",
                model=scope,
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

    def unusable_reason(self, model: str | None = None) -> FallbackReason:
        """
        Why no key may be used now (for a call of C{model}), as a reason
        label of C{openclaw_api_fallbacks_total}: C{"rate_limited"} while a
        key rests after a 429, C{"auth"} when every key is set aside, else
        C{"no_key"}.
        """
        if self.back_in(model) is not None:
            return "rate_limited"
        if self.keys and self._set_aside.issuperset(self.keys):
            return "auth"
        return "no_key"

    def resting_model(self, model: str | None) -> str | None:
        """
        C{model} when a key rests for it (L{rests_by_model}) while another
        key, or that one, could take the provider's other models (not set
        aside, not resting whole): those may take calls, and a client's or
        an operator's message says which model rests.  None otherwise.
        """
        if model is None or not self.rests_by_model:
            return None
        now = self.clock()
        free = any(key not in self._set_aside and self._resting.get(key, 0.0) <= now for key in self.keys)
        return model if free and self.back_in(model) is not None else None

    def back_in(self, model: str | None = None) -> float | None:
        """
        Seconds until the first resting key may be used again (for a call
        of C{model}: the later of its whole rest and its rest for that
        model); None when no key rests (or every unusable key is set
        aside).
        """
        now = self.clock()
        waits = []
        for key in self.keys:
            if key in self._set_aside:
                continue
            until = self._resting.get(key, 0.0)
            if model is not None:
                until = max(until, self._model_resting.get((key, model), 0.0))
            if until > now:
                waits.append(until - now)
        return min(waits) if waits else None

    def states(self) -> dict[str, str]:
        """
        Fingerprint -> C{"ok"}, C{"resting"}, C{"resting for <model>[,
        <model>...]"} (rests by model, L{rests_by_model}) or
        C{"set_aside"}, in order.
        """
        now = self.clock()
        states = {}
        for key in self.keys:
            if key in self._set_aside:
                state = "set_aside"
            elif self._resting.get(key, 0.0) > now:
                state = "resting"
            else:
                models = sorted(
                    model for (rested, model), until in self._model_resting.items() if rested == key and until > now
                )
                state = f"resting for {', '.join(models)}" if models else "ok"
            states[fingerprint(key)] = state
        return states


__all__ = ["DEFAULT_REST_SECONDS", "KeyPool", "fingerprint", "merge_keys", "rest_scope", "rest_subject"]
