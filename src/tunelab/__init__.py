"""tunelab: fine-tune open LLMs with every major strategy, combine them, and measure which one to pick.

The Python API mirrors the CLI::

    import tunelab
    cfg = tunelab.load_config("cfg.yaml", ["training.lr=1e-4"])   # tunelab validate
    result = tunelab.train(cfg)                                    # tunelab train
    tunelab.evaluate(result.run_dir)                               # tunelab eval
    tunelab.generate(result.run_dir, "Hello")                      # tunelab generate
    tunelab.load_artefact(result.run_dir / "model")                # a model/ (or its hub copy) alone
    tunelab.merge(result.run_dir, "merged/")                       # tunelab merge
    tunelab.export(result.run_dir, "model.gguf")                   # tunelab export
    tunelab.compare("grid.yaml")                                   # tunelab compare
    tunelab.report("runs/compare", within=5)                       # tunelab report
    tunelab.measure_layers("cfg.yaml", out="m/")                   # tunelab layers
"""

import warnings

# Deprecation noise from libraries, about calls they make (not tunelab): peft reads transformers'
# deprecated ``is_gradient_checkpointing`` whenever it wraps a model. Matched by message, so nothing else
# is hidden; tunelab's own calls use the current names (tests/test_cli.py checks a run prints no warning).
warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)

from tunelab.config import ConfigError, RunConfig, load_config  # noqa: E402
from tunelab.run import (  # noqa: E402
    RunResult,
    compare,
    evaluate,
    export,
    generate,
    load_artefact,
    load_run,
    measure_layers,
    merge,
    push,
    report,
    train,
)
from tunelab.strategies import Strategy, StrategyConfig, register_strategy  # noqa: E402

__all__ = [
    "ConfigError",
    "RunConfig",
    "RunResult",
    "Strategy",
    "StrategyConfig",
    "compare",
    "evaluate",
    "generate",
    "load_config",
    "load_artefact",
    "load_run",
    "measure_layers",
    "merge",
    "export",
    "push",
    "register_strategy",
    "report",
    "train",
]
__version__ = "0.1.0"
