"""Speed levers change no arithmetic: the loss on loss positions only equals the full head's loss, and its
gradients; frozen weights held in bf16 train the same weights as autocast over fp32 ones."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import final_weights, tiny_config
from tunelab.data import IGNORE
from tunelab.losshead import PositionsHead
from tunelab.run import RunError, train


def _batch(vocab: int, seed: int = 0):
    """Right-padded rows whose labels cover a completion at the end of each row (prompt and padding -100)."""
    g = torch.Generator().manual_seed(seed)
    lengths, prompt = [12, 9, 5], [7, 4, 3]
    ids = torch.full((3, 12), 3, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE)
    for i, (n, p) in enumerate(zip(lengths, prompt, strict=True)):
        ids[i, :n] = torch.randint(4, vocab, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, p:n] = ids[i, p:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _full_loss_and_grads(model, batch, num_items=None):
    model.zero_grad()
    kw = {"num_items_in_batch": num_items} if num_items is not None else {}
    loss = model(**batch, **kw).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _positions_loss_and_grads(model, batch, num_items=None, chunk=None):
    model.zero_grad()
    head = PositionsHead(model)
    if chunk:
        head.chunk = chunk
    with head.capturing(batch["labels"]):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    assert out.logits.shape[1] == 0  # the model's own head computed nothing
    loss = head.loss(num_items)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(full, positions):
    (l1, g1), (l2, g2) = full, positions
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-6)
    assert g1.keys() == g2.keys() and g1
    for name in g1:
        torch.testing.assert_close(g2[name], g1[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("chunk", [None, 3], ids=["one-chunk", "chunks-recomputed"])
@pytest.mark.parametrize("num_items", [None, 40], ids=["mean", "over-accumulated-step"])
def test_positions_head_gives_the_full_heads_loss_and_gradients(tiny_model, chunk, num_items):
    from tunelab.models import load_model

    model = load_model(tiny_model)
    batch = _batch(model.config.vocab_size)
    _assert_same(
        _full_loss_and_grads(model, batch, num_items), _positions_loss_and_grads(model, batch, num_items, chunk)
    )


@pytest.mark.parametrize(
    "peft_cfg",
    [
        {"kind": "lora", "target_modules": ["q_proj", "v_proj", "lm_head"]},
        {"kind": "prompt", "num_virtual_tokens": 4},
        {"kind": "prefix", "num_virtual_tokens": 4},
    ],
    ids=["lora-on-the-head", "prompt-tuning", "prefix"],
)
def test_positions_head_under_peft_wrappers(tiny_llama, peft_cfg):
    """A tuner on the output layer itself, and prompt learners that prepend virtual tokens."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model

    from tunelab.models import load_model

    base = load_model(tiny_llama)
    kind = peft_cfg.pop("kind")
    cls = {"lora": LoraConfig, "prompt": PromptTuningConfig, "prefix": PrefixTuningConfig}[kind]
    model = get_peft_model(base, cls(task_type="CAUSAL_LM", **peft_cfg))
    if kind == "lora":  # B starts at zero; move it so the head's LoRA has a gradient path of its own
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    batch = _batch(base.config.vocab_size, seed=1)
    _assert_same(_full_loss_and_grads(model, batch), _positions_loss_and_grads(model, batch, chunk=4))


def test_positions_head_leaves_other_hooks_on_the_output_layer_every_position(tiny_llama):
    from tunelab.models import load_model

    model = load_model(tiny_llama)
    seen = []
    model.get_output_embeddings().register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    batch = _batch(model.config.vocab_size)
    _positions_loss_and_grads(model, batch)
    assert seen == [torch.Size([3, 12, model.config.hidden_size])]


def test_training_with_the_positions_head_matches_the_full_head(tiny_llama, memo_data, tmp_path):
    runs = {}
    for head in ("full", "positions"):
        cfg = tiny_config(
            tiny_llama, memo_data, tmp_path / head, "lora", max_steps=6, grad_accum=2, loss_head=head
        )
        runs[head] = train(cfg)
    assert runs["positions"].summary["levers"]["loss_head"] == "positions"
    assert runs["full"].summary["levers"]["loss_head"] == "full"
    losses = {
        h: [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        for h, r in runs.items()
    }
    assert len(losses["full"]) >= 3
    assert losses["positions"] == pytest.approx(losses["full"], rel=1e-4)
    w1, w2 = final_weights(runs["full"].run_dir), final_weights(runs["positions"].run_dir)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    ev1, ev2 = runs["full"].summary["eval"], runs["positions"].summary["eval"]
    assert ev2["loss"] == pytest.approx(ev1["loss"], rel=1e-4)


def test_frozen_weights_in_bf16_train_the_same_weights_as_autocast_over_fp32(tiny_llama, memo_data, tmp_path):
    """bf16 autocast rounds each fp32 weight to bf16 before the matmul; holding the frozen ones in bf16 gives
    those same values, so a LoRA run trains the same adapter."""
    runs = {}
    for dtype in ("fp32", "bf16"):
        cfg = tiny_config(
            tiny_llama, memo_data, tmp_path / dtype, "lora", max_steps=5, precision="bf16", frozen_weights=dtype
        )
        runs[dtype] = train(cfg)
    assert runs["bf16"].summary["levers"]["frozen_weights"] == "bf16"
    w1, w2 = final_weights(runs["fp32"].run_dir), final_weights(runs["bf16"].run_dir)
    assert all(v.dtype == torch.float32 for v in w2.values())  # the adapter and its optimizer stay fp32
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=1e-5, msg=k)
    assert runs["bf16"].summary["eval"]["loss"] == pytest.approx(runs["fp32"].summary["eval"]["loss"], rel=1e-3)


def test_cast_frozen_linears_keeps_trained_tied_and_per_task_parts_in_fp32(tiny_llama):
    from peft import LoraConfig, get_peft_model

    from tunelab.levers import cast_frozen_linears
    from tunelab.models import load_model

    model = get_peft_model(load_model(tiny_llama), LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj"]))  # frozen now
    trained = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert cast_frozen_linears(model, trained) > 0
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.lora_A.other.weight"] == torch.float32
    assert dtypes["base_model.model.model.embed_tokens.weight"] == torch.float32  # tied to the head
    assert dtypes["base_model.model.model.norm.weight"] == torch.float32


@pytest.mark.parametrize(
    "training, strategy, message, when",
    [
        # known from the config alone: refused at validation, before anything loads
        ({"frozen_weights": "bf16"}, "lora", "needs training.precision bf16", "validation"),
        ({"frozen_weights": "bf16", "precision": "bf16"}, "full", "changes base weights", "validation"),
        # known once the model is loaded (whether its loss head can take positions)
        (
            {"loss_head": "positions"},
            {"name": "distill", "alpha": 0.5},
            "reads the training batch's logits",
            "load",
        ),
    ],
)
def test_a_lever_that_cannot_work_here_is_refused_naming_it(
    tiny_llama, memo_data, tmp_path, training, strategy, message, when
):
    from tunelab.config import ConfigError

    strategies = ["lora", strategy] if isinstance(strategy, dict) else strategy
    with pytest.raises(ConfigError if when == "validation" else RunError, match=message):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "run", strategies, **training))


def test_auto_levers_say_why_they_stayed_off(tiny_llama, memo_data, tmp_path):
    s = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "full", max_steps=1, precision="bf16")).summary
    assert (
        s["levers"]["frozen_weights"] == "fp32" and "changes base weights" in s["levers"]["why"]["frozen_weights"]
    )
    assert s["levers"]["loss_head"] == "positions" and s["levers"]["optimizer_impl"] == "fused"
    # a tiny model: compiling would cost more than it saves
    assert s["levers"]["compile"] == "off" and "compiling pays from 50,000,000" in s["levers"]["why"]["compile"]


# -- GPU paths: their config logic, on CPU ---------------------------------------------------------------
def _training(**kw):
    from tunelab.config import TrainingConfig

    return TrainingConfig(**kw)


def test_attention_auto_is_eager_on_cpu_sdpa_on_cuda_without_flash_attn_and_flash_explicit_is_refused_here():
    from tunelab.levers import load_options

    lv, opts = load_options(_training(), device="cpu", precision="bf16", changes_base=False)
    assert lv.attention == "eager" and opts == {"attn_implementation": "eager"} and "attention" in lv.why
    if importlib.util.find_spec("flash_attn") is None:
        lv, opts = load_options(_training(), device="cuda", precision="bf16", changes_base=False)
        assert lv.attention == "sdpa" and opts == {"attn_implementation": "sdpa"}
    with pytest.raises(RunError, match="flash_attention_2 needs CUDA, the flash-attn package"):
        load_options(_training(attention="flash_attention_2"), device="cpu", precision="bf16", changes_base=False)
    lv, opts = load_options(_training(attention="sdpa"), device="cpu", precision="fp32", changes_base=False)
    assert opts["attn_implementation"] == "sdpa"


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_base_quantization_needs_cuda_bitsandbytes_and_a_strategy_that_only_adds_modules(bits):
    from tunelab.levers import load_options

    with pytest.raises(RunError, match=rf"base_quantization: {bits} needs a CUDA GPU .*; use none"):
        load_options(_training(base_quantization=bits), device="cpu", precision="bf16", changes_base=False)
    with pytest.raises(RunError, match="only adds modules"):
        load_options(_training(base_quantization=bits), device="cuda", precision="bf16", changes_base=True)


def test_qlora_settings_are_nf4_with_double_quantization_and_half_precision_compute():
    from tunelab.levers import quantization_config

    q = quantization_config("4bit", "bf16")
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert quantization_config("4bit", "fp16").bnb_4bit_compute_dtype == torch.float16
    assert quantization_config("8bit", "bf16").load_in_8bit


@pytest.mark.parametrize("impl", ["fused", "foreach", "for_loop"])
def test_optimizer_impl_builds_that_adamw(impl):
    from tunelab.levers import adamw

    p = torch.nn.Parameter(torch.ones(3))
    opt = adamw([{"params": [p]}], impl, lr=0.1)
    group = opt.param_groups[0]
    assert bool(group["fused"]) == (impl == "fused") and bool(group["foreach"]) == (impl == "foreach")
    p.grad = torch.ones(3)
    opt.step()
    assert torch.all(p < 1)


def _mapped_from(path) -> list[tuple[int, int]]:
    ranges = []
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith(str(path)):
            lo, hi = line.split()[0].split("-")
            ranges.append((int(lo, 16), int(hi, 16)))
    return ranges


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_own_storage_leaves_no_tensor_mapped_from_the_weight_file(tiny_llama):
    """Tensors that stay views of the mapped safetensors file keep the whole file resident (counted in the
    process's memory); after own_storage none does."""
    from tunelab.levers import own_storage
    from tunelab.models import load_model

    model = load_model(tiny_llama)
    weights = (tiny_llama / "model.safetensors").resolve()

    def in_file():
        ranges = _mapped_from(weights)
        return [n for n, p in model.named_parameters() if any(lo <= p.data_ptr() < hi for lo, hi in ranges)]

    assert in_file(), "precondition: transformers maps the weight file and some parameters point into it"
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    own_storage(model)
    assert in_file() == []
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # still tied


# -- compile ---------------------------------------------------------------------------------------------
def test_compiled_blocks_train_the_same_weights_as_eager_ones(tiny_llama, memo_data, tmp_path):
    """Without dropout, whose random stream inductor draws otherwise, compiling changes no arithmetic beyond
    float reordering: the same losses and weights."""
    runs = {}
    for c in ("off", "on"):
        runs[c] = train(tiny_config(tiny_llama, memo_data, tmp_path / c, "full", max_steps=4, compile=c))
    assert runs["on"].summary["levers"]["compile"] == "on"
    off = runs["off"].summary["levers"]
    assert off["compile"] == "off" and "compile" not in off["why"]  # explicit: no reason to give
    losses = {
        c: [json.loads(x)["loss"] for x in (r.run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        for c, r in runs.items()
    }
    assert len(losses["on"]) >= 2 and losses["on"] == pytest.approx(losses["off"], rel=1e-5)
    w1, w2 = final_weights(runs["off"].run_dir), final_weights(runs["on"].run_dir)
    for k in w1:  # Adam scales float noise in near-zero gradients up to ~1e-3 of the learning rate
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-4, msg=k)


def test_compiled_runs_blocks_compiled_only_while_training(tiny_llama):
    from tunelab.levers import compiled, repeated_blocks
    from tunelab.models import load_model

    model = load_model(tiny_llama)
    blocks = repeated_blocks(model)
    assert len(blocks) == model.config.num_hidden_layers and model.config.use_cache
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        with compiled(model, True):
            assert all(b._compiled_call_impl is not None for b in blocks) and not model.config.use_cache
            inside = model(input_ids=ids).logits
    assert all(b._compiled_call_impl is None for b in blocks) and model.config.use_cache
    torch.testing.assert_close(inside, eager, rtol=1e-4, atol=1e-5)
    assert set(model.state_dict()) == set(load_model(tiny_llama).state_dict())  # no wrapper in the names


def test_compile_on_without_a_compiler_is_refused_naming_what_is_missing(
    tiny_llama, memo_data, tmp_path, monkeypatch
):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    with pytest.raises(RunError, match=r"training.compile: on cannot be used here: no C\+\+ compiler found"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", compile="on"))
    s = train(tiny_config(tiny_llama, memo_data, tmp_path / "auto", "lora", max_steps=1)).summary
    assert s["levers"]["compile"] == "off" and "no C++ compiler" in s["levers"]["why"]["compile"]


def test_compile_mode_auto_decides_later_on_stays_on_and_too_short_stays_off():
    from tunelab.compiling import DECIDE_AFTER
    from tunelab.levers import Levers, compile_mode

    assert compile_mode(Levers(compile="on"), "auto", DECIDE_AFTER + 2) == "auto"
    lv = Levers(compile="on")
    assert compile_mode(lv, "auto", DECIDE_AFTER + 1) == "off"
    assert lv.compile == "off" and "too few" in lv.why["compile"]
    assert compile_mode(Levers(compile="on"), "on", 1) == "on"  # asked for explicitly: compiled however short
    assert compile_mode(Levers(compile="off"), "auto", 1000) == "off"


def test_compile_pays_weighs_the_expected_saving_against_the_compile_time_cold_or_warm(tmp_path, monkeypatch):
    from tunelab.compiling import COLD_S, SAVING, WARM_S, History, pays

    assert pays(step_s=3.0, remaining=60, compile_s=10.0, saving=0.15)  # 27 s saved > 10
    assert not pays(step_s=3.0, remaining=60, compile_s=85.0, saving=0.15)  # the demo, cache cold
    cache = tmp_path / "inductor"
    monkeypatch.setattr("tunelab.compiling.inductor_cache_dir", lambda: cache)
    h = History(tmp_path / "home")
    assert h.expected("k", "cpu", "bf16") == (COLD_S["cpu"], SAVING["cpu-bf16"], "cold")  # the defaults
    cache.mkdir()
    (cache / "kernel").write_text("x")
    h.record("k", compile_s=42.0, cache="cold", saving=0.3)
    h = History(tmp_path / "home")  # read back from TUNELAB_HOME/compile.json
    assert h.expected("k", "cpu") == (WARM_S["cpu"], 0.3, "warm")  # this graph compiled into this cache
    h.record("k", compile_s=4.0, cache="warm", saving=0.2)
    assert History(tmp_path / "home").expected("k", "cpu") == (4.0, 0.2, "warm")
    (cache / "kernel").unlink()  # the cache was emptied (a reboot clears /tmp): cold again, as measured
    assert History(tmp_path / "home").expected("k", "cpu") == (42.0, 0.2, "cold")
    assert History(tmp_path / "home").expected("other", "cpu")[2] == "cold"


@pytest.mark.parametrize("history, compiles", [(0.0, True), (1e6, False)], ids=["pays", "does-not-pay"])
def test_compile_auto_times_eager_steps_then_compiles_only_when_it_pays(
    tiny_llama, memo_data, tmp_path, monkeypatch, history, compiles
):
    """A run under auto trains DECIDE_AFTER steps eager, then compiles the rest exactly when the recorded
    compile time is below the time it expects to save; summary.json says which figures decided, the run dir
    keeps the decision, and a resumed run reads it back."""
    from transformers import TrainerCallback

    from tunelab import compiling, levers
    from tunelab.compiling import DECIDE_AFTER

    monkeypatch.setattr(levers, "COMPILE_MIN_PARAMS", 0)  # the tiny model counts as big enough
    monkeypatch.setattr(compiling, "COLD_S", {"cpu": history, "cuda": history})
    monkeypatch.setattr(compiling, "SAVING", {"cpu-fp32": 0.5, "cpu-bf16": 0.5, "cuda": 0.5})
    monkeypatch.setattr(compiling, "inductor_cache_dir", lambda: tmp_path / "inductor")  # cold: not there
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.append(any(b._compiled_call_impl is not None for b in levers.repeated_blocks(model)))

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=DECIDE_AFTER + 3)
    s = train(cfg, callbacks=[Watch()]).summary
    assert seen == [False] * DECIDE_AFTER + [compiles] * 3
    assert s["levers"]["compile"] == ("on" if compiles else "off")
    why = s["levers"]["why"]["compile"]
    assert f"after step {DECIDE_AFTER}" in why and "expected saving" in why and "inductor cache cold" in why
    decision = json.loads((tmp_path / "run" / "compile.json").read_text())
    assert decision["compile"] is compiles and decision["after"] == DECIDE_AFTER
    if compiles:  # it measured what compiling took, for the next run's decision
        home = json.loads((tmp_path / "home" / "compile.json").read_text())
        assert [set(e) >= {"cold_s", "cache_dir"} for e in home.values()] == [True]
