"""
The usage of GATEWAY_API_KEYS' keys (consumer C{-}): they have no limits
to keep, so a call of theirs is one dict update, summed per UTC minute,
provider, model and status.  The sums become usage rows at each flush
(their C{openclaw_consumer_*{consumer="-"}} metrics are counted call by
call, by L{openclaw.consumers.table.ConsumerTable.account_tokens}).
"""

from __future__ import annotations

from openclaw.consumers.model import NO_CONSUMER
from openclaw.consumers.prices import PriceTable
from openclaw.consumers.store import RowIds, UsageRow

#: C{[requests, prompt, completion, reasoning, cached prompt, duration ms]}.
Sums = list[float]


class GatewayUsage:
    """
    The calls of GATEWAY_API_KEYS' keys, summed.

    Costs are worked out from the summed tokens when the sums are taken:
    a price is linear in each kind of token (L{Price.cost}), so the cost of
    a sum is the sum of the costs (the cached tokens of each call are
    bounded by its prompt tokens as they are counted, as L{Price.cost}
    bounds them).  Nothing is kept of what has been taken, so memory does
    not grow with the model names clients send.

    @param prices: the model prices (fixed for the gateway's life).
    @param row_ids: the keys of the rows taken (L{UsageRow.row_id}).
    """

    def __init__(self, prices: PriceTable, row_ids: RowIds | None = None) -> None:
        self.prices = prices
        self.row_ids = row_ids if row_ids is not None else RowIds()
        #: Since the last L{take}, per C{(UTC minute, provider, model, status)}.
        self._pending: dict[tuple[int, str, str, int], Sums] = {}

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
            requests, prompt, completion, reasoning, cached = (int(n) for n in sums[:5])
            duration_ms = sums[5]
            cost = self.prices.cost(provider, model, prompt, completion, cached)
            rows.append(
                UsageRow(
                    minute * 60.0,
                    NO_CONSUMER,
                    NO_CONSUMER,
                    provider,
                    model,
                    status,
                    prompt,
                    completion,
                    reasoning,
                    cost,
                    duration_ms,
                    requests=requests,
                    row_id=self.row_ids(),
                )
            )
        return rows


__all__ = ["GatewayUsage"]
