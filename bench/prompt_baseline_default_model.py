"""Prompt-engineering baselines on the default model and the demo task: zero-shot and 4-shot, no training.

    python bench/prompt_baseline_default_model.py

Same data as the demo (320 generated training tickets, 40 eval tickets, tunelab.demo), answers of up to 24
tokens, max length 1024 (four shown tickets make long prompts). Prints one line per baseline; recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

from common import OUT


def main() -> None:
    from tunelab.demo import make_tickets, write_jsonl
    from tunelab.run import train

    data = OUT / "prompt-baseline-data"
    train_file = write_jsonl(make_tickets(320, seed=1), data / "train.jsonl")
    eval_file = write_jsonl(make_tickets(40, seed=2), data / "eval.jsonl")
    for shots in (0, 4):
        cfg = {
            "data": {"train": str(train_file), "eval": str(eval_file)},
            "strategy": {"name": "prompt-only", "shots": shots},
            "training": {"max_length": 1024},
            "eval": {"max_new_tokens": 24, "batch_size": 20},
            "output_dir": str(OUT / f"prompt-{shots}-shot"),
        }
        s = train(cfg, overwrite=True).summary
        e = s["eval"]
        took = f"{s['wall_time_s']:.0f} s"
        print(f"{shots}-shot: exact match {e['exact_match']:.1%}, eval loss {e['loss']:.3f}, {took}")
        print(f"  e.g. {e['samples'][0]['prediction']!r} for {e['samples'][0]['reference']!r}")


if __name__ == "__main__":
    main()
