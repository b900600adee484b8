"""tunelab: fine-tune open LLMs with every major strategy, combine them, and measure which one to pick.

The Python API mirrors the CLI::

    import tunelab
    cfg = tunelab.load_config("cfg.yaml", ["training.lr=1e-4"])   # tunelab validate
    result = tunelab.train(cfg)                                    # tunelab train
    tunelab.evaluate(result.run_dir)                               # tunelab eval
    tunelab.generate(result.run_dir, "Hello")                      # tunelab generate
    tunelab.merge(result.run_dir, "merged/")                       # tunelab merge
    tunelab.compare("grid.yaml")                                   # tunelab compare
    tunelab.report("runs/compare", within=5)                       # tunelab report
"""

from tunelab.config import ConfigError, RunConfig, load_config
from tunelab.run import RunResult, compare, evaluate, generate, load_run, merge, report, train
from tunelab.strategies import Strategy, StrategyConfig, register_strategy

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
    "load_run",
    "merge",
    "register_strategy",
    "report",
    "train",
]
__version__ = "0.1.0"
