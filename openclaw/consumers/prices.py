"""
What a call costs: US dollars per million tokens, per C{provider/model}.

Each provider module ships the prices of its models (its adapter's
C{prices}: Kimi's and Gemini's list prices as their providers published
them); L{shipped_prices} gathers them into one table at start-up, and
C{PRICES_FILE} overrides and extends it::

    {"updated": "2026-11-01",
     "models": {"gemini/gemini-2.5-flash": {"prompt": 0.30, "completion": 2.50, "cached_prompt": 0.075},
                "kimi/moonshot-v1-8k": {"prompt": 0.20, "completion": 2.00}}}

Completion tokens include reasoning tokens (both providers bill thinking
as output).  A model with no price has cost None, never 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import orjson

from openclaw.files import NotARegularFile, read_regular_file

if TYPE_CHECKING:
    from openclaw.providers.base import ProviderAdapter


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
        """
        What a call costs, in US dollars, at these prices (US dollars per
        million tokens): C{cached_tokens} of the prompt (at most all of it)
        at the cached rate when the model has one, the rest of the prompt
        at the prompt rate, the completion (reasoning included) at the
        completion rate.
        """
        cached = min(max(cached_tokens, 0), prompt_tokens) if self.cached_prompt is not None else 0
        cached_rate = self.cached_prompt if self.cached_prompt is not None else self.prompt
        return (
            (prompt_tokens - cached) * self.prompt + cached * cached_rate + completion_tokens * self.completion
        ) / 1_000_000


def shipped_prices(adapters: Iterable[type[ProviderAdapter]] | None = None) -> dict[str, Price]:
    """
    The shipped table, C{"<provider id>/<model>"} -> L{Price}: the prices
    each of C{adapters} (by default the built-in providers) declares.
    """
    if adapters is None:
        from openclaw.settings import builtin_providers

        adapters = builtin_providers()
    return {f"{adapter.id}/{model}": price for adapter in adapters for model, price in adapter.prices.items()}


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


#: The most bytes of C{PRICES_FILE} read: a price is some 80 bytes, so
#: room for over ten thousand models.
MAX_PRICES_FILE_BYTES = 1024 * 1024


def load_prices_file(path: Path) -> dict[str, Price]:
    """
    The prices in C{path}, read as an untrusted file
    (L{openclaw.files.read_regular_file}, links followed): only a regular
    file of at most L{MAX_PRICES_FILE_BYTES}, without waiting on it (a
    FIFO would hang start-up, a device never end).

    @raise PricesError: unreadable, not a regular file of that size, not
        JSON or not the documented form.
    """
    try:
        document = orjson.loads(read_regular_file(path, MAX_PRICES_FILE_BYTES, follow_links=True))
    except NotARegularFile as e:
        raise PricesError(
            f"PRICES_FILE={str(path)!r} is refused: {e}; point PRICES_FILE at a regular JSON file "
            f"of at most {MAX_PRICES_FILE_BYTES // 1024 // 1024} MiB"
        ) from None
    except OSError as e:
        raise PricesError(f"PRICES_FILE={str(path)!r} cannot be read: {e.strerror}") from None
    except orjson.JSONDecodeError as e:
        raise PricesError(f"PRICES_FILE={str(path)!r} is not JSON: {e}") from None
    return parse_prices(document, f"PRICES_FILE={str(path)!r}")


@attrs.frozen
class PriceTable:
    prices: Mapping[str, Price] = attrs.field(factory=shipped_prices)

    @classmethod
    def with_overrides(
        cls, overrides: Mapping[str, Price], adapters: Iterable[type[ProviderAdapter]] | None = None
    ) -> PriceTable:
        """
        The prices C{adapters} ship (L{shipped_prices}), C{overrides}
        (C{PRICES_FILE}) over them.
        """
        return cls({**shipped_prices(adapters), **overrides})

    def priced(self, provider: str, model: str) -> bool:
        """
        Whether C{provider/model} has a price.
        """
        return f"{provider}/{model}" in self.prices

    def cost(self, provider: str, model: str, prompt: int, completion: int, cached: int = 0) -> float | None:
        """
        US dollars, or None when C{provider/model} has no price.
        """
        price = self.prices.get(f"{provider}/{model}")
        return None if price is None else price.cost(prompt, completion, cached)


__all__ = [
    "MAX_PRICES_FILE_BYTES",
    "Price",
    "PriceTable",
    "PricesError",
    "load_prices_file",
    "parse_prices",
    "shipped_prices",
]
