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

import importlib  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402

#: the API, by the module that defines each name. Imported on first use, so that ``import tunelab`` stays
#: light: the ``tunelab`` command picks its C allocator (tunelab.malloc) before torch is imported.
_API = {
    **dict.fromkeys(["ConfigError", "RunConfig", "load_config"], "tunelab.config"),
    **dict.fromkeys(["Strategy", "StrategyConfig", "register_strategy"], "tunelab.strategies"),
    **dict.fromkeys(
        ["RunResult", "compare", "evaluate", "export", "generate", "load_artefact", "load_run"]
        + ["measure_layers", "merge", "push", "report", "train"],
        "tunelab.run",
    ),
}
__all__ = sorted(_API)
__version__ = "0.1.0"


class _Package(types.ModuleType):
    def __getattr__(self, name: str):  # called only for a name not set yet
        if name not in _API:
            raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
        value = getattr(importlib.import_module(_API[name]), name)
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value) -> None:
        # importing the submodule tunelab.evaluate sets it on the package: the API's evaluate() stays
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted({*self.__dict__, *_API})


sys.modules[__name__].__class__ = _Package
