"""Tiny models built from configs and data the tests write: nothing is downloaded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

WORDS = (
    "the a cat dog sat on mat red blue green one two three four five yes no hello world ticket billing "
    "technical account shipping high low medium category priority answer question what is colour of sky "
    "grass sun moon classify text label positive negative review good bad movie book"
).split()


def build_tokenizer():
    """A byte-level BPE tokenizer with ChatML special tokens and chat template (fast: has offsets)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] + [
        '{"json": "yes"}\n',
        "0123456789.,:?!",
    ]
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<pad>", unk_token=None
    )
    fast.chat_template = CHATML
    return fast


def build_model(arch: str, vocab: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    # initializer_range 0.3 (not HF's 0.02): with tiny embeddings and a tied head the logits stay near
    # uniform whatever the blocks do, and an adapter could never memorise anything.
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            pad_token_id=3,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.3,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=256,
            pad_token_id=3,
            bos_token_id=1,
            eos_token_id=2,
            initializer_range=0.3,
        )
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg)


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    tok = build_tokenizer()
    model = build_model(arch, len(tok), seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def _tunelab_home(tmp_path_factory):
    """Caches (converted models, retention references) go to a temporary home, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TUNELAB_HOME", str(tmp_path_factory.mktemp("tunelab-home")))
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def _verbosity_stays(monkeypatch):
    """A test that calls ``cli.main`` in this process (``-q``) sets TUNELAB_VERBOSITY for it, as the command
    does for its own process; undone after the test, so a later test's subprocess is not run quiet."""
    monkeypatch.delenv("TUNELAB_VERBOSITY", raising=False)  # and whatever the test sets, undone after it


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request, tiny_llama, tiny_gpt2) -> Path:
    return {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]


@pytest.fixture(scope="module")
def tok():
    """The tiny test tokenizer (with a chat template)."""
    return build_tokenizer()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A TUNELAB_HOME of the test's own: an empty data cache."""
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


MEMO_ROWS = [
    {"prompt": "what is the colour of the sky ?", "completion": "blue"},
    {"prompt": "what is the colour of grass ?", "completion": "green"},
    {"prompt": "classify : good movie", "completion": "positive"},
    {"prompt": "classify : bad book", "completion": "negative"},
]


@pytest.fixture
def memo_data(tmp_path) -> Path:
    """A memorisable prompt/completion set (4 rows, repeated so an epoch has several batches)."""
    return write_jsonl(tmp_path / "memo.jsonl", MEMO_ROWS * 4)


@pytest.fixture(scope="module")
def uneven_data(tmp_path_factory) -> Path:
    """16 rows of different lengths, so length grouping decides the order of the batches."""
    rows = [
        {"prompt": " ".join(WORDS[i : i + 1 + (i * 7) % 13]), "completion": " ".join(WORDS[i + 3 : i + 5])}
        for i in range(16)
    ]
    return write_jsonl(tmp_path_factory.mktemp("uneven") / "uneven.jsonl", rows)


def tiny_config(model_dir: Path, data: Path, out: Path, strategy="lora", **training) -> dict:
    t = {
        "max_steps": 8,
        "batch_size": 4,
        "lr": 1e-2,
        "logging_steps": 2,
        "save_steps": 100,
        "precision": "fp32",
        "max_length": 64,
    }
    t.update(training)
    return {
        "model": str(model_dir),
        "data": {"train": str(data), "eval": str(data)},
        "strategy": strategy,
        "training": t,
        "eval": {"max_new_tokens": 4, "batch_size": 8},
        "output_dir": str(out),
    }


def logged_losses(run_dir: Path) -> list[float]:
    """The training losses a run logged, in order (``metrics.jsonl``)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in lines if '"loss"' in x]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The trained tensors a run saved (its adapter, its whole model, or each component of a hybrid), keyed
    ``<file>:<tensor>``."""
    from safetensors.torch import load_file

    d = run_dir / "model"
    return {
        f"{f.relative_to(d)}:{k}": v for f in sorted(d.rglob("*.safetensors")) for k, v in load_file(f).items()
    }


def crash_at(step: int):
    """A callback that kills the run (a KeyboardInterrupt out of the training loop) once ``step`` is done."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt("simulated kill")

    return Crash()
