"""Strategy registry. Importing this package registers the built-in strategies."""

# registration side effect: each module registers its strategies
from tunelab.strategies import (  # noqa: E402,F401
    adapters,
    distill,
    dropout,
    ewc,
    full,
    heads,
    ia3,
    l2,
    l2sp,
    layerwise,
    lora,
    peft_any,
    prompt_learning,
    prompting,
    replay,
    retention,
    student,
)
from tunelab.strategies.base import (
    SHARDED,
    Need,
    Phase,
    Regularizer,
    Strategy,
    StrategyConfig,
    StrategyError,
    build_strategies,
    check_distributed,
    get_strategy,
    mark_trainable,
    register_strategy,
    registered,
    unwrap,
    validate_strategy_specs,
)
from tunelab.strategies.importance import ESTIMATORS, LayerScores
from tunelab.strategies.importance import Settings as MeasureSettings
from tunelab.strategies.importance import measure as measure_blocks

__all__ = [
    "ESTIMATORS",
    "SHARDED",
    "LayerScores",
    "MeasureSettings",
    "measure_blocks",
    "Need",
    "Phase",
    "Regularizer",
    "Strategy",
    "StrategyConfig",
    "StrategyError",
    "build_strategies",
    "check_distributed",
    "mark_trainable",
    "unwrap",
    "get_strategy",
    "register_strategy",
    "registered",
    "validate_strategy_specs",
]
