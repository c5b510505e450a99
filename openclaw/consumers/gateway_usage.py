"""
The usage of GATEWAY_API_KEYS' keys (consumer C{-}): they have no limits
to keep, so a call of theirs is one dict update, summed per UTC minute,
provider, model and status.  The sums become usage rows at each flush and
C{openclaw_consumer_*{consumer="-"}} figures when C{/metrics} is read.
"""

from __future__ import annotations

from collections.abc import Iterator

from openclaw.consumers.model import NO_CONSUMER
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import UsageRow

#: C{[requests, prompt, completion, reasoning, cached prompt, duration ms]}.
Sums = list[float]
_FIELDS = 6


def _add(into: Sums, sums: Sums) -> None:
    for i in range(_FIELDS):
        into[i] += sums[i]


class GatewayUsage:
    """
    The calls of GATEWAY_API_KEYS' keys, summed.

    Costs are worked out from the summed tokens when the sums are read:
    a price is linear in each kind of token (L{Price.cost}), so the cost of
    a sum is the sum of the costs (the cached tokens of each call are
    bounded by its prompt tokens as they are counted, as L{Price.cost}
    bounds them).

    @param prices: the model prices (fixed for the gateway's life).
    """

    def __init__(self, prices: PriceTable) -> None:
        self.prices = prices
        #: Since the last L{take}, per C{(UTC minute, provider, model, status)}.
        self._pending: dict[tuple[int, str, str, int], Sums] = {}
        #: Everything taken before, per C{(provider, model, status)}.
        self._taken: dict[tuple[str, str, int], Sums] = {}

    def count(
        self, provider: str, model: str, status: int, tokens: tuple[int, int, int, int], seconds: float, now: float
    ) -> None:
        """
        Count one call.

        @param tokens: C{(prompt, completion, reasoning, cached prompt)}.
        @param seconds: the call's whole time.
        @param now: POSIX seconds, for its UTC minute.
        """
        key = (int(now // 60), provider, model, status)
        sums = self._pending.get(key)
        if sums is None:
            sums = self._pending[key] = [0, 0, 0, 0, 0, 0.0]
        prompt, completion, reasoning, cached = tokens
        sums[0] += 1
        sums[1] += prompt
        sums[2] += completion
        sums[3] += reasoning
        sums[4] += cached if cached < prompt else prompt
        sums[5] += seconds * 1000

    def take(self) -> list[UsageRow]:
        """
        The calls counted since the last take, as usage rows: one per
        C{(UTC minute, provider, model, status)}, its C{ts} the minute's
        start, its C{requests} the calls summed.
        """
        pending, self._pending = self._pending, {}
        rows = []
        for (minute, provider, model, status), sums in pending.items():
            requests, prompt, completion, reasoning, cached, duration_ms = sums
            cost = self.prices.cost(provider, model, int(prompt), int(completion), int(cached))
            rows.append(
                UsageRow(
                    minute * 60.0,
                    NO_CONSUMER,
                    NO_CONSUMER,
                    provider,
                    model,
                    status,
                    int(prompt),
                    int(completion),
                    int(reasoning),
                    cost,
                    duration_ms,
                    requests=int(requests),
                )
            )
            taken = self._taken.get((provider, model, status))
            if taken is None:
                self._taken[(provider, model, status)] = list(sums)
            else:
                _add(taken, sums)
        return rows

    def _totals(self) -> Iterator[tuple[str, str, int, Sums]]:
        """
        Every call counted so far, per C{(provider, model, status)}.
        """
        totals = {key: list(sums) for key, sums in self._taken.items()}
        for (_, provider, model, status), sums in self._pending.items():
            total = totals.get((provider, model, status))
            if total is None:
                totals[(provider, model, status)] = list(sums)
            else:
                _add(total, sums)
        for (provider, model, status), sums in totals.items():
            yield provider, model, status, sums

    def requests(self) -> dict[int, int]:
        """
        Calls counted so far, by HTTP status.
        """
        by_status: dict[int, int] = {}
        for _, _, status, sums in self._totals():
            by_status[status] = by_status.get(status, 0) + int(sums[0])
        return by_status

    def tokens(self) -> tuple[int, int, int]:
        """
        C{(prompt, completion, reasoning)} tokens counted so far.
        """
        prompt = completion = reasoning = 0
        for _, _, _, sums in self._totals():
            prompt += int(sums[1])
            completion += int(sums[2])
            reasoning += int(sums[3])
        return prompt, completion, reasoning

    def spend(self) -> float:
        """
        US dollars spent so far (priced models only).
        """
        spent = 0.0
        for provider, model, _, sums in self._totals():
            spent += self.prices.cost(provider, model, int(sums[1]), int(sums[2]), int(sums[4])) or 0.0
        return spent


__all__ = ["GatewayUsage"]
