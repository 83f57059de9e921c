"""The price table (`cost/prices.yaml`, or a copy passed with `--prices` / `eval.prices`): read and checked once here,
for `tuneloop cost` (compute entries) and `tuneloop eval` (what an API model's answers cost).

API entries price tokens: `usd_per_million_output_tokens` (required) and `usd_per_million_input_tokens`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tuneloop.errors import ConfigError

# The table shipped with tuneloop; it lives beside the cost stage that documents it.
DEFAULT_PRICES = Path(__file__).with_name("cost") / "prices.yaml"


def load_prices(path: Path | None) -> dict[str, Any]:
    """The price table at `path` (default: the shipped one), with every entry checked."""
    path = path or DEFAULT_PRICES
    try:
        table = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read the price table {path}: {error}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: the price table must be a mapping with `compute:` and `api:` sections")
    for name, entry in (table.get("compute") or {}).items():
        if not isinstance(entry, dict) or ("usd_per_hour" not in entry and "usd_per_second" not in entry):
            raise ConfigError(
                f"{path}: compute.{name} needs usd_per_hour or usd_per_second", hint="see the comments in prices.yaml"
            )
    for name, entry in (table.get("api") or {}).items():
        if not isinstance(entry, dict) or "usd_per_million_output_tokens" not in entry:
            raise ConfigError(f"{path}: api.{name} needs usd_per_million_output_tokens")
    return table


@dataclass(frozen=True)
class TokenPrice:
    """One `api:` entry: dollars per million tokens."""

    entry: str  # its name in the table
    usd_per_million_output_tokens: float
    usd_per_million_input_tokens: float | None

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """Dollars for these tokens; prompt tokens are free when the entry has no input price."""
        input_price = self.usd_per_million_input_tokens or 0.0
        return (prompt_tokens * input_price + completion_tokens * self.usd_per_million_output_tokens) / 1e6


def api_price(table: dict[str, Any], names: list[str]) -> TokenPrice | None:
    """The first `api:` entry named one of `names` (in order), or None when the table prices none of them."""
    entries = table.get("api") or {}
    for name in names:
        entry = entries.get(name)
        if entry is not None:
            input_price = entry.get("usd_per_million_input_tokens")
            return TokenPrice(
                name,
                float(entry["usd_per_million_output_tokens"]),
                float(input_price) if input_price is not None else None,
            )
    return None
