"""``tunelab`` command line: train | validate | eval | generate | merge | export | push | compare | report |
layers | strategies | demo.

Each verb is one entry of :data:`VERBS` and a thin layer over the Python API of the same name (``tunelab.train``
etc.). Errors a user can fix (bad config, bad data, missing model, occupied output dir, an unreadable or full
disk) print one clear message and exit 2; a diverged run exits 3; SIGINT or SIGTERM stop the run cleanly with
exit 130 and say how to resume. ``--debug`` shows the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

# Quiet third-party noise before they are imported; users see tunelab's own output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# never download at run time; `tunelab push` is the one verb that talks to the hub, uploading what it is told
if "push" not in [a for a in sys.argv[1:] if not a.startswith("-")][:1]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ----------------------------------------------------------------------------- the verbs, one table


def _overrides(p: argparse.ArgumentParser, example: str = "training.lr=1e-4") -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=f"override, e.g. {example}")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    _overrides(p)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in output_dir")


def _train(args) -> int:
    from tunelab.run import train

    result = train(args.config, overrides=args.set, resume=args.resume, overwrite=args.overwrite)
    if result.summary.get("outputs"):  # each mode says what its results are
        from tunelab.modes import MODES

        print("\n" + "\n".join(MODES[result.summary["mode"]].result_lines(result.summary)))
    return 0


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config")
    _overrides(p)


def _validate(args) -> int:
    from tunelab.config import check_model_fit, load_config
    from tunelab.lab.grid import check_grid, is_grid

    if is_grid(args.config):  # a comparison grid: every variant's runs, as compare would build them
        return print(check_grid(args.config, args.set)) or 0
    cfg = load_config(args.config, args.set)
    check_model_fit(cfg)  # options that ask more of the model than it has (its config.json alone)
    what = f"{cfg.mode}: {'+'.join(cfg.strategy_names())} on {cfg.model}"
    print(f"{args.config}: ok ({what}, output_dir {cfg.output_dir})")
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a run directory, or a model name/path for a baseline")
    p.add_argument("--data", help="JSONL/JSON/CSV/Parquet file (default: the run's eval file)")
    p.add_argument("--task", help="multi-task runs: score this task (its eval file, its own parts)")
    _overrides(p, "eval.max_examples=50")


def _eval(args) -> int:
    from tunelab.run import evaluate

    print(json.dumps(evaluate(args.target, args.data, args.set, task=args.task), indent=2))
    return 0


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="a run directory, or a model name/path")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--system", help="system message")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--task", help="multi-task runs with parts per task: answer with this task's parts")


def _generate(args) -> int:
    from tunelab.run import generate

    opts = {"max_new_tokens": args.max_new_tokens, "system": args.system, "temperature": args.temperature}
    opts["task"] = args.task
    print(generate(args.target, args.prompt, **opts))
    return 0


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run")
    p.add_argument("out")


def _merge(args) -> int:
    from tunelab.run import merge

    print(f"merged model written to {merge(args.run, args.out)}")
    return 0


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run")
    p.add_argument("out", help="the GGUF file to write (a new file)")
    p.add_argument("--format", default="gguf", choices=["gguf"])
    p.add_argument("--type", default="f16", choices=["f32", "f16", "bf16", "q8_0"], help="weight type")


def _export(args) -> int:
    from tunelab.run import export

    print(f"GGUF written to {export(args.run, args.out, args.format, args.type)}")
    return 0


def _push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run")
    p.add_argument("repo_id", help="the model repository, e.g. you/ticket-triage-lora (created if absent)")
    p.add_argument("--private", action="store_true", help="create the repository private")


def _push(args) -> int:
    from tunelab.run import push

    print(f"uploaded to {push(args.run, args.repo_id, private=args.private)}")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("grid", nargs="?", help="a grid YAML: base config + named variants (docs/compare.md)")
    p.add_argument("--preset", help="a ready-made comparison instead of a grid: guide (docs/results.md)")
    p.add_argument("--output-dir", help="--preset only: the comparison directory (default runs/<preset>)")
    p.add_argument("--steps", type=int, help="--preset only: training steps per variant (guide: 30)")
    p.add_argument("--model", help="--preset only: the model (default: the default model)")
    p.add_argument("--seeds", type=int, help="--preset only: train every row once per seed (means, intervals)")
    p.add_argument("--search", action="store_true", help="--preset only: choose each row's lr on a dev split")
    p.add_argument("--task", help="--preset only: the data (guide: triage, extraction, translation, summaries)")


def _compare(args) -> int:
    from tunelab.errors import RunError
    from tunelab.lab.compare import check_finished
    from tunelab.run import compare

    for flag, n in (("steps", args.steps), ("seeds", args.seeds)):
        if n is not None and n <= 0:
            raise RunError(f"--{flag} must be a positive number of {flag}, got {n}")
    given = {k: getattr(args, k) for k in ("output_dir", "steps", "model", "seeds", "search", "task")}
    out = compare(args.grid, preset=args.preset, **given)
    print(f"comparison written to {out}/ (report.html, report.md, results.csv)")
    print((out / "report.md").read_text().split("\n\n|")[0].removeprefix("# Comparison\n\n"))
    check_finished(out)  # exit code 1, naming each variant that gave no result
    return 0


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="a comparison directory (tunelab compare's output_dir)")
    p.add_argument("--within", type=float, default=None, help="N in 'cheapest within N%% of the best' (0-100)")


def _report(args) -> int:
    from pathlib import Path

    from tunelab.errors import RunError
    from tunelab.lab.compare import check_finished
    from tunelab.lab.grid import read_grid
    from tunelab.run import report

    out = Path(args.dir)
    within = args.within if args.within is not None else read_grid(out).report.within
    if not 0 <= within <= 100:
        raise RunError(f"--within {within}: a percentage from 0 to 100")
    files = report(out, within=within)
    print(f"report rebuilt: {files['html']}, {files['md']}, {files['csv']}")
    check_finished(out)
    return 0


def _layers_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="a run config: its model, its training data (dev split) and training.seed")
    _overrides(p)
    p.add_argument("--out", default=".", help="where layers.json and layers.png go (default: here)")
    p.add_argument(
        "--by",
        default="grad_norm,fisher,probe",
        help="estimators, comma-separated: grad_norm, fisher, probe (default: all three)",
    )


def _layers(args) -> int:
    from tunelab.layers import CHART, measure_layers

    estimators = tuple(e.strip() for e in args.by.split(",") if e.strip())
    scores, path = measure_layers(args.config, args.set, args.out, estimators)
    print(scores.table())
    took = ", ".join(f"{e} {s:.0f} s" for e, s in scores.seconds.items())
    print(f"\nwritten: {path}, {path.parent / CHART} ({took})")
    print("use it: layerwise: {select: auto, by: ESTIMATOR, budget: 0.25, scores: " + str(path) + "}")
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--model", default="smollm2-135m-instruct")


def _demo(args) -> int:
    from tunelab.demo import run_demo

    run_demo(args.out, steps=args.steps, model=args.model)
    return 0


def _strategies_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="show this strategy's options with their defaults and help")


def _strategies(args) -> int:
    from tunelab.strategies import StrategyError, registered

    found = registered()
    if args.name is None:
        for name, cls in sorted(found.items(), key=lambda kv: (kv[1].declares.phase, kv[0])):
            options = [f for f in cls.Config.model_fields if f != "name"]
            print(f"{name:<10} {cls.declares.phase.name.lower():<11} {cls.summary}")
            print(f"{'':<22} options: {', '.join(options)}")
        print("\n`tunelab strategies NAME` shows one strategy's options with their defaults.")
        return 0
    if args.name not in found:
        raise StrategyError(f"unknown strategy '{args.name}'; registered: {', '.join(sorted(found))}")
    cls = found[args.name]
    print(f"{cls.name} ({cls.declares.phase.name.lower()}): {cls.summary}")
    for field, info in cls.Config.model_fields.items():
        if field != "name":
            default = "(required)" if info.is_required() else repr(info.get_default(call_default_factory=True))
            print(f"  {field} = {default}\n      {info.description}")
    return 0


@dataclass(frozen=True)
class Verb:
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Every CLI verb: its help, its arguments and what it runs (each a thin layer over the Python API).
VERBS: dict[str, Verb] = {
    "train": Verb("train as a YAML config says", _train_args, _train),
    "validate": Verb("check a config without training", _validate_args, _validate),
    "eval": Verb("score a run (or a bare model) on its eval file or --data", _eval_args, _eval),
    "generate": Verb("answer a prompt with a run's model (chat template applied)", _generate_args, _generate),
    "merge": Verb("fold a run's adapter into a standalone safetensors model", _merge_args, _merge),
    "export": Verb("write a run's (merged) model as a GGUF file for llama.cpp / Ollama", _export_args, _export),
    "push": Verb("upload a run's model/ (weights, tokenizer, model card) to a model hub", _push_args, _push),
    "compare": Verb("run several strategies on the same data and budget, and report", _compare_args, _compare),
    "report": Verb("rebuild a comparison's report from its files", _report_args, _report),
    "layers": Verb(
        "measure how much each block matters for a config's task (layerwise select)", _layers_args, _layers
    ),
    "strategies": Verb("list the strategies: phase, summary, options", _strategies_args, _strategies),
    "demo": Verb("LoRA on the default model for support-ticket triage, before vs after", _demo_args, _demo),
}


def _output_flags(p: argparse.ArgumentParser, default) -> None:
    """-q / -v / --debug, before the verb or after it (a verb's copy leaves the value given before alone)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "-q",
        "--quiet",
        action="store_const",
        dest="verbosity",
        const="quiet",
        default=default,
        help="no progress bars or status lines: the result and errors only",
    )
    g.add_argument(
        "-v",
        "--verbose",
        action="store_const",
        dest="verbosity",
        const="verbose",
        default=default,
        help="also the libraries' info logs and deprecation warnings",
    )
    p.add_argument("--debug", action="store_true", default=default, help="show the traceback of an error as well")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tunelab", description="Fine-tune open LLMs and measure the result.")
    _output_flags(p, None)
    sub = p.add_subparsers(dest="verb", required=True)
    for name, verb in VERBS.items():
        _output_flags(sub.add_parser(name, help=verb.help), argparse.SUPPRESS)
        verb.arguments(sub.choices[name])
    return p


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, a scheduler) stops the run as Ctrl-C does: cleanly


def console() -> int:
    """The ``tunelab`` command: :func:`main`, run under a size-class C allocator where the system has one
    (tunelab.malloc: the process runs again with it preloaded, before anything heavy is imported)."""
    from tunelab import malloc

    try:
        malloc.preload()
    except ValueError as e:
        print(f"tunelab: error: {e}", file=sys.stderr)
        return 2
    return main()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.debug = bool(args.debug)
    from tunelab.progress import set_verbosity

    set_verbosity(args.verbosity or os.environ.get("TUNELAB_VERBOSITY") or "normal")
    from tunelab.config import ConfigError
    from tunelab.data import DataError
    from tunelab.errors import Interrupted, RunError
    from tunelab.models import ModelNotFound
    from tunelab.strategies import StrategyError

    signal.signal(signal.SIGTERM, _terminate)
    try:
        return VERBS[args.verb].run(args)
    except (ConfigError, DataError, ModelNotFound, RunError, StrategyError) as e:
        return _fail(args, e, getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        return _fail(args, Interrupted("interrupted"), Interrupted.exit_code)
    except OSError as e:  # the file system said no: permissions, a full disk, a path that is a file
        from pathlib import Path

        from tunelab.fsutil import write_failure

        where = Path(e.filename).parent if e.filename else Path.cwd()
        return _fail(args, write_failure(e, where) or str(e), 2)
    finally:
        _leave_process_group()


def _leave_process_group() -> None:
    """Close the process group torchrun's processes trained in (the Trainer opened it) before the
    interpreter exits: gloo's threads, torn down by the interpreter's exit instead, can abort the process
    (``terminate called without an active exception``), which torchrun reports as a failed run."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fail(args, error, code: int) -> int:
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()  # a progress bar left open would repaint itself after the message, at exit
    if args.debug:
        import traceback

        traceback.print_exc()
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") != "1" else "0"
    who = f" (process {rank} of {os.environ['WORLD_SIZE']})" if rank != "0" else ""  # torchrun: one line each
    print(f"tunelab {args.verb}{who}: error: {error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(console())
