"""Layer-wise fine-tuning without guessing (issue 22): the blocks measured (tunelab.layers), chosen from the
measurement (``layerwise: {select: auto}``), and LISA's sampled blocks; the options' refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from transformers import TrainerCallback

from conftest import WORDS, build_model, build_tokenizer, tiny_config, write_jsonl
from tunelab.config import DataConfig
from tunelab.data import prepare_rows
from tunelab.run import train
from tunelab.strategies.block_choice import select
from tunelab.strategies.importance import ESTIMATORS, LayerScores, Settings, block_parts, measure

ROWS = [{"prompt": " ".join(WORDS[i % 40 : i % 40 + 5]), "completion": WORDS[(i * 3) % 40]} for i in range(64)]
SMALL = Settings(rows=16, batch_size=4, dev_rows=8)


@pytest.fixture(scope="module")
def rows_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("rows") / "rows.jsonl", ROWS)


def _features():
    tok = build_tokenizer()
    feats = prepare_rows(ROWS, tok, DataConfig(train="rows.jsonl"), 64, source="rows").features
    return tok, feats[:48], feats[48:]


# ----------------------------------------------------------------------------- measuring


@pytest.mark.parametrize("arch, shortcut", [("llama", True), ("gpt2", False)])
def test_measuring_scores_every_block_and_leaves_the_model_as_found(arch, shortcut):
    tok, train_rows, dev_rows = _features()
    model = build_model(arch, len(tok))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    scores = measure(model, train_rows, dev_rows, tok.pad_token_id, SMALL)

    assert set(scores.scores) == set(ESTIMATORS) and scores.n_blocks == 2
    for est, parts in scores.scores.items():
        assert len(parts["block"]) == 2 and all(torch.isfinite(torch.tensor(parts["block"]))), est
    assert all(v > 0 for v in scores.scores["grad_norm"]["block"] + scores.scores["fisher"]["block"])
    # attention and MLP are scored apart by the gradient estimators
    assert {"attention", "mlp"} <= set(scores.scores["grad_norm"]) and {"attention", "mlp"} <= set(
        scores.scores["fisher"]
    )
    assert scores.params["block"][0] == sum(p.numel() for p in block_parts(model)[0]["block"])
    # the upper-blocks shortcut is taken exactly where it gives the model's own logits (GPT-2 adds position
    # embeddings to its inputs: it is not)
    assert scores.shortcut is shortcut
    # untouched: every weight bit-identical, trainable flags and mode as found, no gradient left behind
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert model.training and all(p.grad is None for p in model.parameters())


def test_a_measurement_is_deterministic_for_a_seed_and_the_probe_shortcut_changes_nothing():
    tok, train_rows, dev_rows = _features()
    model = build_model("llama", len(tok))
    a = measure(model, train_rows, dev_rows, tok.pad_token_id, SMALL)
    b = measure(model, train_rows, dev_rows, tok.pad_token_id, SMALL)
    assert a.scores == b.scores
    whole = measure(model, train_rows, dev_rows, tok.pad_token_id, Settings(**{**vars(SMALL), "shortcut": False}))
    assert whole.shortcut is False
    torch.testing.assert_close(
        torch.tensor(whole.scores["probe"]["block"]),
        torch.tensor(a.scores["probe"]["block"]),
        rtol=1e-3,
        atol=1e-5,
    )
    other = measure(model, train_rows, dev_rows, tok.pad_token_id, Settings(**{**vars(SMALL), "seed": 1}))
    assert other.scores["grad_norm"] != a.scores["grad_norm"]  # another seed draws other rows


# ----------------------------------------------------------------------------- selecting


def _scores(n=4, attention=(4, 1, 3, 2), mlp=(1, 4, 2, 3), block=(2, 3, 1, 4)) -> LayerScores:
    return LayerScores(
        n,
        {"block": [30] * n, "attention": [10] * n, "mlp": [20] * n, "norms": [0] * n},
        {
            "grad_norm": {"block": list(block), "attention": list(attention), "mlp": list(mlp)},
            "probe": {"block": [1] * n},
        },
    )


def test_selection_fits_the_budget_and_splits_attention_from_mlp():
    s = _scores()
    assert select(s, "grad_norm", 2, ["attention", "mlp", "norms"]).parts == {
        1: ["attention", "mlp", "norms"],
        3: ["attention", "mlp", "norms"],
    }  # a number of blocks: whole blocks by their own score
    # a share: 0.5 of 120 = 60 parameters; units by score: attn0 (4, 10), mlp1 (4, 20), attn2 (3, 10),
    # mlp3 (3, 20) -> 60 exactly
    chosen = select(s, "grad_norm", 0.5, ["attention", "mlp"])
    assert chosen.parts == {0: ["attention"], 1: ["mlp"], 2: ["attention"], 3: ["mlp"]}
    assert "50.0%" in chosen.why and "grad_norm" in chosen.why
    # only the kinds asked for are units; norms go with a chosen part's block
    assert select(s, "grad_norm", 0.25, ["mlp", "norms"]).parts == {1: ["mlp", "norms"]}
    # an estimator that scores whole blocks only (the probe): ties go to the higher block
    assert select(s, "probe", 0.5, ["attention", "mlp"]).parts == {
        2: ["attention", "mlp"],
        3: ["attention", "mlp"],
    }
    with pytest.raises(ValueError, match="less than the smallest unit"):
        select(s, "grad_norm", 0.05, ["attention", "mlp"])


# ----------------------------------------------------------------------------- select: auto in a run


class Grads(TrainerCallback):
    """Which parameters had gradients at each optimizer step, and which the optimizer held state for after it."""

    def __init__(self):
        self.grads: list[set[str]] = []
        self.state: list[set[str]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n for n, p in model.named_parameters() if p.grad is not None})

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        names = {id(p): n for n, p in model.named_parameters()}
        inner = getattr(optimizer, "optimizer", optimizer)
        self.state.append({names[id(p)] for p in inner.state if inner.state[p]})


def _block_of(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[parts.index("layers") + 1]) if "layers" in parts else None


@pytest.mark.parametrize("by", ESTIMATORS)
def test_select_auto_trains_the_measured_choice_and_records_it(by, tiny_llama, rows_data, tmp_path):
    strategy = {"name": "layerwise", "select": "auto", "by": by, "budget": 1}
    grads = Grads()
    run = train(tiny_config(tiny_llama, rows_data, tmp_path / "run", strategy, max_steps=4), callbacks=[grads])
    report = run.summary["strategies"]["layerwise"]
    scores = report["measurement"]["scores"]["block"]
    best = max(range(2), key=lambda i: (scores[i], i))
    assert report["chosen"]["blocks"] == {str(best): ["attention", "mlp", "norms"]}
    assert by in report["chosen"]["why"]
    assert {_block_of(n) for g in grads.grads for n in g} == {best}
    saved = LayerScores.load(tmp_path / "run" / "layers.json")
    assert saved.scores[by]["block"] == scores


def test_select_auto_reads_a_measurement_file_and_composes_with_prefix_and_lr_decay(
    tiny_llama, rows_data, tmp_path
):
    from tunelab.layers import measure_layers

    cfg = tiny_config(tiny_llama, rows_data, tmp_path / "run", "full", max_steps=2)
    _, path = measure_layers(cfg, out=tmp_path / "m", estimators=("fisher",))
    assert (tmp_path / "m" / "layers.png").stat().st_size > 1000
    strategy = [
        {
            "name": "layerwise",
            "select": "auto",
            "by": "fisher",
            "scores": str(path),
            "budget": 0.5,
            "lr_decay": 0.5,
        },
        {"name": "prefix", "num_virtual_tokens": 4},
    ]
    run = train(tiny_config(tiny_llama, rows_data, tmp_path / "run", strategy, max_steps=2))
    report = run.summary["strategies"]["layerwise"]
    assert report["measurement"]["file"] == str(path)
    assert not (tmp_path / "run" / "layers.json").exists()  # nothing measured in the run
    assert set(run.summary["parameters"]["components"]) == {"layerwise", "prefix"}


# ----------------------------------------------------------------------------- LISA


def test_lisa_trains_gamma_blocks_at_a_time_with_optimizer_state_for_them_only(tiny_llama, rows_data, tmp_path):
    grads = Grads()
    strategy = {"name": "layerwise", "sample": 1, "every": 2}
    train(tiny_config(tiny_llama, rows_data, tmp_path / "run", strategy, max_steps=12), callbacks=[grads])
    drawn = []
    for with_grad, with_state in zip(grads.grads, grads.state, strict=True):
        blocks = {_block_of(n) for n in with_grad} - {None}
        assert len(blocks) == 1  # γ = 1 block at a time
        assert any("embed" in n for n in with_grad)  # the embeddings (tied to the head) always train
        # the optimizer holds moments for the drawn block and the embeddings, never for a block drawn before
        assert {_block_of(n) for n in with_state} - {None} == blocks
        drawn.append(blocks.pop())
    assert all(drawn[k] == drawn[k + 1] for k in range(0, 12, 2))  # a draw lasts `every` steps
    assert len(set(drawn)) == 2  # and the draws differ over the run


# ----------------------------------------------------------------------------- refusals


def _cli(tmp_path, strategy, model, data, verb="validate"):
    cfg = tiny_config(model, data, tmp_path / "run", strategy)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "tunelab.cli", verb, str(path)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "strategy, message",
    [
        ({"name": "layerwise", "select": "auto", "budget": 0}, "budget 0: give a share"),
        ({"name": "layerwise", "select": "auto", "budget": 1.5}, "at most 1"),
        ({"name": "layerwise", "select": "auto", "blocks": [0]}, "give select or top/blocks, not both"),
        ({"name": "layerwise", "sample": 3}, "sample: 3 blocks at a time, but the model has 2 blocks"),
        ({"name": "layerwise", "select": "auto", "budget": 5}, "budget: 5 blocks, but the model has 2 blocks"),
        ({"name": "layerwise", "top": 1, "every": 4}, "every is LISA's draw period"),
        ({"name": "layerwise", "top": 1, "by": "probe"}, "by ranks blocks for select: auto"),
        ({"name": "layerwise", "sample": 1, "unfreeze_every_steps": 2}, "choose one"),
    ],
)
def test_bad_options_are_one_line_at_validation(strategy, message, tiny_llama, rows_data, tmp_path):
    p = _cli(tmp_path, strategy, tiny_llama, rows_data)
    assert p.returncode == 2, p.stderr
    assert message in p.stderr and "Traceback" not in p.stderr
    assert f"{tmp_path / 'cfg.yaml'}:" in p.stderr  # the file and line


def test_a_model_without_recognisable_blocks_is_refused_at_validation(rows_data, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    # Blenderbot's decoder: its config's layer count (the encoder's, 2) matches no list of blocks (3)
    config = AutoConfig.for_model(
        "blenderbot", encoder_layers=2, decoder_layers=3, d_model=32, encoder_ffn_dim=32, decoder_ffn_dim=32,
        vocab_size=len(build_tokenizer()),
    )  # fmt: skip
    odd = tmp_path / "odd"
    AutoModelForCausalLM.from_config(config).save_pretrained(odd)
    build_tokenizer().save_pretrained(odd)
    p = _cli(tmp_path, {"name": "layerwise", "sample": 1}, odd, rows_data)
    assert p.returncode == 2, p.stderr
    assert "strategy.0: layerwise needs transformer blocks: cannot find the 2 transformer blocks" in p.stderr
    assert "Traceback" not in p.stderr


def test_tunelab_layers_writes_its_files_and_never_replaces_a_file_of_yours(tiny_llama, rows_data, tmp_path):
    cfg = tiny_config(tiny_llama, rows_data, tmp_path / "run", "full")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "tunelab.cli", "layers", str(path), "--by", "grad_norm,probe"]
    p = subprocess.run([*cmd, "--out", str(tmp_path / "m")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "grad_norm" in p.stdout and "probe" in p.stdout and "fisher" not in p.stdout.split("written")[0]
    assert set(LayerScores.load(tmp_path / "m" / "layers.json").scores) == {"grad_norm", "probe"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "layers.json").write_text("my notes")
    p = subprocess.run([*cmd, "--out", str(mine)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "is not a tunelab measurement" in p.stderr
    assert (mine / "layers.json").read_text() == "my notes"


def test_tunelab_strategies_layerwise_documents_every_option():
    from tunelab.strategies.layerwise import LayerwiseConfig

    p = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "strategies", "layerwise"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    for field in ("select", "budget", "by", "scores", "sample", "every", "sample_by"):
        help_text = LayerwiseConfig.model_fields[field].description
        assert help_text and f"  {field} = " in p.stdout and help_text in p.stdout, field
