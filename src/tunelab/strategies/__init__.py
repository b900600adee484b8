"""Strategy registry. Importing this package registers the built-in strategies."""

from tunelab.strategies import full, lora  # noqa: E402,F401  (registration side effect)
from tunelab.strategies.base import (
    Strategy,
    StrategyConfig,
    StrategyError,
    build_strategies,
    get_strategy,
    register_strategy,
    registered,
    validate_strategy_specs,
)

__all__ = [
    "Strategy",
    "StrategyConfig",
    "StrategyError",
    "build_strategies",
    "get_strategy",
    "register_strategy",
    "registered",
    "validate_strategy_specs",
]
