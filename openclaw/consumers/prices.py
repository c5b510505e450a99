"""
What a call costs: US dollars per million tokens, per C{provider/model}.

A table ships for the Kimi and Gemini models the README names (list
prices as their providers published them: platform.moonshot.ai/docs/pricing
and ai.google.dev/gemini-api/docs/pricing, for prompts up to 128k/200k
tokens); C{PRICES_FILE} overrides and extends it::

    {"updated": "2026-11-01",
     "models": {"gemini/gemini-2.5-flash": {"prompt": 0.30, "completion": 2.50, "cached_prompt": 0.075},
                "kimi/moonshot-v1-8k": {"prompt": 0.20, "completion": 2.00}}}

Completion tokens include reasoning tokens (both providers bill thinking
as output).  A model with no price has cost None, never 0.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import orjson


@attrs.frozen
class Price:
    """
    US dollars per million tokens.  C{cached_prompt}: for prompt tokens
    served from the provider's cache (OpenAI's
    C{usage.prompt_tokens_details.cached_tokens}); None: as C{prompt}.
    """

    prompt: float
    completion: float
    cached_prompt: float | None = None

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        cached = min(max(cached_tokens, 0), prompt_tokens) if self.cached_prompt is not None else 0
        cached_rate = self.cached_prompt if self.cached_prompt is not None else self.prompt
        return (
            (prompt_tokens - cached) * self.prompt + cached * cached_rate + completion_tokens * self.completion
        ) / 1_000_000


#: The shipped table (USD per million tokens).
SHIPPED: Mapping[str, Price] = {
    "kimi/moonshot-v1-8k": Price(0.20, 2.00),
    "kimi/moonshot-v1-32k": Price(1.00, 3.00),
    "kimi/moonshot-v1-128k": Price(2.00, 5.00),
    "kimi/kimi-k2.5": Price(0.60, 3.00, 0.10),
    "gemini/gemini-2.5-flash": Price(0.30, 2.50, 0.075),
    "gemini/gemini-2.5-pro": Price(1.25, 10.00, 0.31),
    "gemini/gemini-flash-latest": Price(0.30, 2.50, 0.075),
    "gemini/gemini-embedding-001": Price(0.15, 0.0),
}


class PricesError(ValueError):
    """
    C{PRICES_FILE} is unusable; the message says where and what to write.
    """


def _rate(value: object, where: str) -> float:
    if type(value) not in (int, float) or not 0 <= value < float("inf"):  # type: ignore[operator]
        raise PricesError(f"{where} must be a number of US dollars per million tokens, 0 or more")
    return float(value)  # type: ignore[arg-type]


def parse_prices(document: Any, source: str = "PRICES_FILE") -> dict[str, Price]:
    """
    The C{models} of a prices document.

    @raise PricesError: not the documented form.
    """
    if not isinstance(document, dict) or not isinstance(document.get("models"), dict):
        raise PricesError(f'{source} must be a JSON object with "models": {{"provider/model": {{...}}}}')
    table: dict[str, Price] = {}
    for name, entry in document["models"].items():
        if "/" not in name:
            raise PricesError(f"{source}: {name!r} must be provider/model, such as gemini/gemini-2.5-flash")
        if not isinstance(entry, dict) or not {"prompt", "completion"} <= entry.keys():
            raise PricesError(f'{source}: {name} needs "prompt" and "completion" (USD per million tokens)')
        unknown = entry.keys() - {"prompt", "completion", "cached_prompt"}
        if unknown:
            raise PricesError(f"{source}: {name} has unknown field(s) {', '.join(sorted(unknown))}")
        cached = entry.get("cached_prompt")
        table[name] = Price(
            _rate(entry["prompt"], f"{source}: {name}.prompt"),
            _rate(entry["completion"], f"{source}: {name}.completion"),
            None if cached is None else _rate(cached, f"{source}: {name}.cached_prompt"),
        )
    return table


def load_prices_file(path: Path) -> dict[str, Price]:
    """
    @raise PricesError: unreadable, not JSON or not the documented form.
    """
    try:
        document = orjson.loads(path.read_bytes())
    except OSError as e:
        raise PricesError(f"PRICES_FILE={str(path)!r} cannot be read: {e.strerror}") from None
    except orjson.JSONDecodeError as e:
        raise PricesError(f"PRICES_FILE={str(path)!r} is not JSON: {e}") from None
    return parse_prices(document, f"PRICES_FILE={str(path)!r}")


@attrs.frozen
class PriceTable:
    prices: Mapping[str, Price] = attrs.field(factory=lambda: dict(SHIPPED))

    @classmethod
    def with_overrides(cls, overrides: Mapping[str, Price]) -> PriceTable:
        return cls({**SHIPPED, **overrides})

    def cost(self, provider: str, model: str, prompt: int, completion: int, cached: int = 0) -> float | None:
        """
        US dollars, or None when C{provider/model} has no price.
        """
        price = self.prices.get(f"{provider}/{model}")
        return None if price is None else price.cost(prompt, completion, cached)


__all__ = ["SHIPPED", "Price", "PriceTable", "PricesError", "load_prices_file", "parse_prices"]
