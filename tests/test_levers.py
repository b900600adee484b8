"""Speed levers change no arithmetic: the loss on loss positions only equals the full head's loss, and its
gradients; frozen weights held in bf16 train the same weights as autocast over fp32 ones."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from conftest import final_weights, logged_losses, tiny_config
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


@pytest.mark.parametrize("head_trains", [True, False], ids=["head-trains", "head-frozen"])
def test_positions_head_computes_in_the_autocast_the_forward_ran_in(tiny_llama, head_trains):
    """The Trainer autocasts the model's forward, not the loss taken after it: the head applied to the kept
    positions computes as the model's own head would have inside the forward (a bf16 matmul, the loss in
    fp32), not in fp32 (5x slower on a CPU's bf16 matmuls, and other values). A frozen head casts its weight
    again in backward instead of keeping the cast: the same gradients."""
    from tunelab.models import load_model

    model = load_model(tiny_llama)
    model.get_output_embeddings().weight.requires_grad_(head_trains)  # tied: the input embeddings too
    batch = _batch(model.config.vocab_size, seed=2)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = model(**batch).loss
    full.backward()
    g_full = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    head = PositionsHead(model)
    with torch.autocast("cpu", dtype=torch.bfloat16), head.capturing(batch["labels"]):
        model(**{k: v for k, v in batch.items() if k != "labels"})
    positions = head.loss()  # outside the autocast, as the engine takes it
    positions.backward()
    torch.testing.assert_close(positions, full, rtol=1e-5, atol=1e-6)
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, g_full[name], rtol=1e-3, atol=1e-5, msg=name)


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
    losses = {h: logged_losses(r.run_dir) for h, r in runs.items()}
    assert len(losses["full"]) >= 3
    assert losses["positions"] == pytest.approx(losses["full"], rel=1e-4)
    w1, w2 = final_weights(runs["full"].run_dir), final_weights(runs["positions"].run_dir)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    ev1, ev2 = runs["full"].summary["eval"], runs["positions"].summary["eval"]
    assert ev2["loss"] == pytest.approx(ev1["loss"], rel=1e-4)


@pytest.mark.parametrize("strategy", ["lora", {"name": "prompt", "num_virtual_tokens": 4}])
def test_eval_loss_on_loss_positions_is_the_full_heads(tiny_llama, memo_data, monkeypatch, tmp_path, strategy):
    """Evaluation applies the vocabulary head at the loss positions only; its loss and token count are those
    of the full head's logits (prompt learners' virtual tokens included)."""
    import sys

    from tunelab.config import DataConfig, load_config
    from tunelab.data import prepare_file
    from tunelab.evaluate import loss_and_perplexity
    from tunelab.models import load_model, load_tokenizer
    from tunelab.strategies.stack import StrategyStack

    tok = load_tokenizer(tiny_llama)
    prepared = prepare_file(memo_data, tok, DataConfig(train=str(memo_data)), 64)
    cfg = load_config(tiny_config(tiny_llama, memo_data, tmp_path / "run", strategy))
    model = StrategyStack(cfg.strategy).apply(load_model(tiny_llama)).eval()
    fast = loss_and_perplexity(model, prepared, tok.pad_token_id, 3, bf16=False)
    monkeypatch.setattr(sys.modules["tunelab.evaluate"], "supports_positions_head", lambda m: "forced: full")
    full = loss_and_perplexity(model, prepared, tok.pad_token_id, 3, bf16=False)
    assert fast["tokens"] == full["tokens"] > 0
    assert fast["loss"] == pytest.approx(full["loss"], rel=1e-5)


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
    assert s["levers"]["allocator"] == "reuse" and "allocator" not in s["levers"]["why"]  # CPU, glibc


ALLOCATOR_PROBE = """
import resource, sys, torch
import tunelab.run  # what a training process imports: its small free chunks serve the small requests made
# between two steps, which would otherwise split the block just freed (and the next step's would not fit)
from tunelab.malloc import glibc
from tunelab.runtime import reusing_freed_memory

def faults_to_fill(n):  # minor page faults taken to allocate n floats and write them once; freed after
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(n)
    t.fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del t
    return faults

if glibc() is None:
    sys.exit(3)
n = 16 * 2**20  # 64 MiB of floats: above the largest threshold (32 MiB) from which glibc maps blocks
faults_to_fill(n)
# the fewest faults of three steps each (the step after the lever: one)
default = min(faults_to_fill(n) for _ in range(3))
with reusing_freed_memory(True):
    faults_to_fill(n)  # the first steps fault the heap in: the 2nd may still be served from fresh pages
    faults_to_fill(n)
    reused = min(faults_to_fill(n) for _ in range(3))
after = faults_to_fill(n)
print(n * 4 // 4096, default, reused, after)
"""


def test_allocator_reuse_keeps_freed_memory_for_the_next_step_and_hands_it_back_after():
    # in a process of its own: the heap an earlier test's training left behind holds free blocks whose pages
    # were handed back, and a request may be served from one of those instead of the block just freed
    p = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE], capture_output=True, text=True, timeout=120)
    if p.returncode == 3:
        pytest.skip("the allocator lever acts on glibc's malloc only")
    assert p.returncode == 0, p.stderr[-2000:]
    pages, default, reused, after = map(int, p.stdout.split())
    assert default > pages // 2  # glibc's default: mapped, unmapped when freed, faulted in again
    assert reused < pages // 10  # under the lever a steady step's block reuses pages an earlier step freed
    assert after > pages // 2  # the defaults are back and the memory was handed back


def test_allocator_reuse_is_refused_without_glibc_and_auto_says_why(tiny_llama, memo_data, tmp_path, monkeypatch):
    from tunelab import malloc

    monkeypatch.setattr(malloc, "in_use", lambda: "system")  # a C library other than glibc (musl, macOS)
    with pytest.raises(RunError, match="training.allocator: reuse tunes glibc's allocator, not system"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "a", "lora", max_steps=1, allocator="reuse"))
    s = train(tiny_config(tiny_llama, memo_data, tmp_path / "b", "lora", max_steps=1)).summary
    assert s["levers"]["allocator"] == "system" and s["levers"]["malloc"] == "system"
    assert s["levers"]["why"]["allocator"] == "the C library is not glibc"


def _saved_bytes_and_grads(model, batch, recompute: bool, autocast: bool = False, kept: list | None = None):
    """What autograd keeps for backward (bytes, parameters excluded) and the gradients, with the attention
    probabilities recomputed in backward or kept; ``kept`` collects the (dtype, shape) of each kept tensor."""
    from tunelab.attention import recomputing

    params = {p.data_ptr() for p in model.parameters()}
    saved = []

    def pack(t):
        if t.data_ptr() not in params:
            saved.append(t.numel() * t.element_size())
            if kept is not None:
                kept.append((t.dtype, tuple(t.shape)))
        return t

    model.zero_grad()
    with (
        recomputing(model, recompute),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast),
    ):
        assert model.config._attn_implementation == ("tunelab_eager_recompute" if recompute else "eager")
        loss = model(**batch).loss
    assert model.config._attn_implementation == "eager"  # switched back after
    loss.backward()
    return sum(saved), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_attention_probs_recompute_under_autocast_keeps_the_query_in_half_precision(tiny_llama):
    """Rotary embeddings leave the query in fp32 (their cos and sin are fp32); the attention's matmul reads its
    bf16 cast. Recomputing, the checkpoint keeps the bf16 cast, not the fp32 tensor: the same values, so the
    same gradients as keeping the probabilities, bit for bit (the key stays fp32: see attention._as_autocast)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    batch = _batch(model.config.vocab_size)
    c = model.config
    rows, length = batch["input_ids"].shape
    head = c.hidden_size // c.num_attention_heads
    assert c.num_key_value_heads < c.num_attention_heads  # grouped-query: the key is repeated per group
    query = (rows, c.num_attention_heads, length, head)
    recomputed = []
    _, l1, g1 = _saved_bytes_and_grads(model, batch, recompute=False, autocast=True)
    _, l2, g2 = _saved_bytes_and_grads(model, batch, recompute=True, autocast=True, kept=recomputed)
    assert (
        sum(1 for dtype, shape in recomputed if shape == query and dtype == torch.bfloat16) == c.num_hidden_layers
    )
    assert (torch.float32, query) not in recomputed, "the fp32 query is kept"
    assert torch.equal(l1, l2)
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


def test_attention_probs_recompute_keeps_less_for_backward_and_gives_the_same_gradients(tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager")
    batch = _batch(model.config.vocab_size)
    kept, l1, g1 = _saved_bytes_and_grads(model, batch, recompute=False)
    recomputed, l2, g2 = _saved_bytes_and_grads(model, batch, recompute=True)
    c = model.config
    rows, length = batch["input_ids"].shape
    probs = c.num_hidden_layers * rows * c.num_attention_heads * length**2 * 4  # the softmax's fp32 output
    assert recomputed <= kept - probs  # at least the probabilities are no longer kept
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys()
    for name in g1:  # the same kernels on the same inputs: the same values, bit for bit
        assert torch.equal(g1[name], g2[name]), name


def test_attention_probs_recompute_trains_the_same_weights_and_auto_says_when_it_stays_off(
    tiny_llama, memo_data, tmp_path
):
    runs = {
        probs: train(
            tiny_config(tiny_llama, memo_data, tmp_path / probs, "lora", max_steps=3, attention_probs=probs)
        )
        for probs in ("keep", "auto")
    }
    assert runs["auto"].summary["levers"]["attention_probs"] == "recompute"  # CPU: eager attention
    assert runs["keep"].summary["levers"]["attention_probs"] == "keep"
    w1, w2 = final_weights(runs["keep"].run_dir), final_weights(runs["auto"].run_dir)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    config = json.loads((runs["auto"].run_dir / "model" / "adapter_config.json").read_text())
    assert "tunelab_eager_recompute" not in json.dumps(config)

    s = train(tiny_config(tiny_llama, memo_data, tmp_path / "sdpa", "lora", max_steps=1, attention="sdpa")).summary
    assert s["levers"]["attention_probs"] == "keep"
    assert "attention sdpa keeps no probabilities" in s["levers"]["why"]["attention_probs"]
    gc = tiny_config(tiny_llama, memo_data, tmp_path / "gc", "lora", max_steps=1, gradient_checkpointing=True)
    s = train(gc).summary
    assert s["levers"]["attention_probs"] == "keep" and "whole blocks" in s["levers"]["why"]["attention_probs"]
    with pytest.raises(
        RunError, match=r"^training.attention_probs: recompute cannot be used here: attention sdpa"
    ):
        train(
            tiny_config(
                tiny_llama,
                memo_data,
                tmp_path / "x",
                "lora",
                max_steps=1,
                attention="sdpa",
                attention_probs="recompute",
            )
        )


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
    losses = {c: logged_losses(r.run_dir) for c, r in runs.items()}
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


def test_compiled_blocks_take_a_batch_as_long_as_another_dimension_without_another_graph(tiny_llama):
    """Under dynamic shapes torch gives sizes equal at trace time one symbol ("duck" sizing): a first batch
    as long as the head dimension would trace a graph for that length only (and miss inductor's disk cache in
    a later run), and the next length would compile again."""
    from torch._dynamo.utils import counters

    from tunelab.levers import compiled
    from tunelab.models import load_model

    model = load_model(tiny_llama, attn_implementation="eager")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    graphs = []
    with compiled(model, True):
        for n in (head_dim, head_dim + 3, 5):  # first as long as the head dimension, then others
            ids = torch.randint(0, model.config.vocab_size, (2, n))
            model(input_ids=ids, labels=ids).loss.backward()
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[1:] == graphs[:1] * 2
    import torch.fx.experimental._config as fx_config

    assert fx_config.use_duck_shape  # torch's default again after training


def test_compiled_blocks_trace_one_graph_once(tiny_llama, memo_data, tmp_path):
    """A float a block hands to the recomputed attention (its scale) traced as a symbol made dynamo throw its
    first trace away and trace each block again (every graph went through AOT autograd twice); and the first
    block, whose input needed no gradient under LoRA, traced a graph of its own."""
    import torch._dynamo.config as dynamo_config
    from torch._dynamo.utils import counters

    before = counters["aot_autograd"]["total"], counters["stats"]["unique_graphs"]
    run = train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=1, compile="on"))
    assert run.summary["levers"]["attention_probs"] == "recompute"
    aot = counters["aot_autograd"]["total"] - before[0]
    graphs = counters["stats"]["unique_graphs"] - before[1]
    assert graphs == 1 and aot == graphs
    assert not dynamo_config.specialize_float  # torch's default again after training


def test_compile_on_without_a_compiler_is_refused_naming_what_is_missing(
    tiny_llama, memo_data, tmp_path, monkeypatch
):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    with pytest.raises(RunError, match=r"training.compile: on cannot be used here: no C\+\+ compiler found"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", compile="on"))
    s = train(tiny_config(tiny_llama, memo_data, tmp_path / "auto", "lora", max_steps=1)).summary
    assert s["levers"]["compile"] == "off" and "no C++ compiler" in s["levers"]["why"]["compile"]


def test_compile_mode_auto_decides_on_stays_on_off_stays_off():
    from tunelab.levers import Levers, compile_mode

    assert compile_mode(Levers(compile="on"), "auto") == "auto"
    assert compile_mode(Levers(compile="on"), "on") == "on"  # asked for explicitly: compiled however short
    assert compile_mode(Levers(compile="off"), "auto") == "off"  # resolved off (a tiny model, no compiler)


def test_compile_pays_weighs_the_expected_saving_against_the_compile_time_cold_or_warm(tmp_path, monkeypatch):
    from tunelab.compiling import COLD_S, SAVING, History, pays, step_size

    assert pays(60, eager_s=5.6, compiled_s=3.3, compile_s=45.0)  # the demo on 2 AVX2 cores: 138 s saved
    assert not pays(60, eager_s=1.2, compiled_s=1.0, compile_s=60.0)  # 12 s saved: not with a cold cache
    assert pays(60, eager_s=1.2, compiled_s=1.0, compile_s=6.0)  # but with a warm one
    cache = tmp_path / "inductor"
    monkeypatch.setattr("tunelab.compiling.inductor_cache_dir", lambda: cache)
    h = History(tmp_path / "home")
    x = h.expected("k", "cpu", "fp32", 2.0)  # nothing known: the defaults, from the measured eager step
    assert x["cache"] == "cold" and x["compile_s"] == COLD_S["cpu"] and x["eager_s"] == 2.0
    assert x["compiled_s"] == pytest.approx(2.0 * (1 - SAVING["cpu-fp32"]))
    cache.mkdir()
    (cache / "kernel").write_text("x")
    assert [step_size(n) for n in (1, 464, 512, 513, 960, 4240)] == ["1", "512", "512", "1024", "1024", "8192"]
    h.record("k", "512", cold_s=42.0, compiled_over_eager=0.9, compiled_ratio=0.1)  # the old estimate's ratio
    h.record("k", "8192", compiled_over_eager=0.7)  # long rows gain more: one graph, a ratio per step size
    h.record("k", "8192", compiled_over_eager=0.6)  # the least saving of the last runs counts
    x = History(tmp_path / "home").expected("k", "cpu", "fp32", 2.0, "512")  # read back from TUNELAB_HOME
    # warm now, and no warm compile measured for this graph yet: it counts as long as its cold one
    assert x == {"eager_s": 2.0, "compiled_s": pytest.approx(1.8), "compile_s": 42.0, "cache": "warm"}
    assert History(tmp_path / "home").expected("k", "cpu", "fp32", 2.0, "8192")["compiled_s"] == pytest.approx(1.4)
    for r in (0.5, 0.5, 0.5):  # the last RATIOS_KEPT (3) only
        h.record("k", "8192", compiled_over_eager=r)
    assert History(tmp_path / "home").expected("k", "cpu", "fp32", 2.0, "8192")["compiled_s"] == pytest.approx(1.0)
    x = History(tmp_path / "home").expected("k", "cpu", "fp32", 2.0, "1024")  # a size not measured: the default
    assert x["compiled_s"] == pytest.approx(2.0 * (1 - SAVING["cpu-fp32"]))
    h.record("k", warm_s=4.0)
    assert History(tmp_path / "home").expected("k", "cpu", "fp32", 2.0)["compile_s"] == 4.0
    (cache / "kernel").unlink()  # the cache was emptied (a reboot clears /tmp): cold again, as measured
    assert History(tmp_path / "home").expected("k", "cpu", "fp32", 2.0)["compile_s"] == 42.0
    assert History(tmp_path / "home").expected("other", "cpu", "fp32", 2.0)["cache"] == "cold"


@pytest.mark.parametrize(
    "history, steps, compiles",
    [(0.0, 5, True), (1e6, 5, False), (0.0, 3, False)],
    ids=["pays", "does-not-pay", "short"],
)
def test_compile_auto_times_eager_steps_then_compiles_only_when_it_pays(
    tiny_llama, memo_data, tmp_path, monkeypatch, history, steps, compiles
):
    """A run under auto trains its first three steps eager, then compiles every later step, or none, as the
    expected compile time is below or above the time it expects to save from the eager steps' time; a run
    with no step left after those three does not time them. summary.json says which figures decided, the run
    dir keeps the decision for a resume, TUNELAB_HOME what compiling took against the eager step."""
    from transformers import TrainerCallback

    from tunelab import compiling, levers

    monkeypatch.setattr(levers, "COMPILE_MIN_PARAMS", 0)  # the tiny model counts as big enough
    monkeypatch.setattr(compiling, "COLD_S", {"cpu": history, "cuda": history})
    monkeypatch.setattr(compiling, "inductor_cache_dir", lambda: tmp_path / "inductor")  # cold: not there
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.append(any(b._compiled_call_impl is not None for b in levers.repeated_blocks(model)))

    cfg = tiny_config(tiny_llama, memo_data, tmp_path / "run", "lora", max_steps=steps)
    s = train(cfg, callbacks=[Watch()]).summary
    assert seen == [False] * 3 + [compiles] * (steps - 3)
    assert s["levers"]["compile"] == ("on" if compiles else "off")
    why = s["levers"]["why"]["compile"]
    decision = json.loads((tmp_path / "run" / "compile.json").read_text())
    assert decision["compile"] is compiles and decision["why"] == why
    if steps == 3:
        assert why == "not compiling: 3 steps, none left after the 3 eager ones it would time"
        assert not (tmp_path / "home" / "compile.json").exists()
        return
    assert "2 steps left x" in why and "s eager, steps to 3" in why and "inductor cache cold" in why
    assert decision["from_step"] == 4 and decision["eager_s"] > 0
    assert why.startswith("compiling from step 4" if compiles else "not compiling")
    # what a compiled run measured, for the next run's decision: its compile time, and its compiled steps
    # against the eager step it timed; an eager run has nothing to add (each run times its own)
    home = tmp_path / "home" / "compile.json"
    if compiles:
        (learnt,) = json.loads(home.read_text()).values()
        assert set(learnt) - {"when"} == {"cold_s", "compiled_over_eager", "cache_dir"}
        assert list(learnt["compiled_over_eager"]) == [decision["size"]] and int(decision["size"]) >= 8
        assert len(learnt["compiled_over_eager"][decision["size"]]) == 1
    else:
        assert not home.exists()


@pytest.mark.parametrize("first, second", [(1.5, 1.0), (1.0, 1.5)], ids=["warm-up", "second-slowed"])
def test_compile_auto_takes_the_fastest_eager_step_and_learns_per_step_size(tmp_path, monkeypatch, first, second):
    """The eager step it weighs is the fastest of the three it timed (a warm-up, or a step slowed by something
    else running, must not decide); a compiled run records its steady steps over that step for its size."""
    import time
    from types import SimpleNamespace

    from tunelab import compiling

    monkeypatch.setattr(compiling, "inductor_cache_dir", lambda: tmp_path / "inductor")
    monkeypatch.setattr(compiling, "COLD_S", {"cpu": 0.1, "cuda": 0.1})  # 4 steps x 0.15 s saved: it pays
    ticks = iter([0.0, first, 10.0, 10.0 + second, 20.0, 21.2] + [30.0 + i * 0.5 for i in range(8)])
    monkeypatch.setattr(
        compiling, "time", SimpleNamespace(perf_counter=lambda: next(ticks), strftime=time.strftime)
    )
    started = []
    timer = compiling.CompileTimer(
        lambda: started.append(True), auto=True, planned=6, key="k", precision="bf16", run_dir=tmp_path,
        home=tmp_path / "home",
    )  # fmt: skip
    timer.on_train_begin(None, SimpleNamespace(global_step=0), None)
    for step in range(1, 7):
        timer.on_step_begin(
            None, SimpleNamespace(global_step=step - 1, num_input_tokens_seen=(step - 1) * 900), None
        )
        timer.on_step_end(None, SimpleNamespace(global_step=step, num_input_tokens_seen=step * 900), None)
        assert started == [True] * (step >= 3)  # decided at step 3, compiled from step 4
    assert timer.decision["eager_s"] == 1.0 and timer.decision["size"] == "1024"
    assert "(1.00 s eager, steps to 3 - 0.85 s compiled, expected)" in timer.decision["why"]
    timer.on_train_end(None, SimpleNamespace(global_step=6), None)  # compiled steps 4-6 took 0.5 s each
    learnt = json.loads((tmp_path / "home" / "compile.json").read_text())["k"]
    assert learnt["compiled_over_eager"] == {"1024": [0.5]} and learnt["cold_s"] == 0.0


@pytest.mark.parametrize("killed_at, decided", [(4, True), (3, False)], ids=["after-the-decision", "before-it"])
def test_a_resumed_auto_run_compiles_as_the_run_it_continues_decided(
    tiny_llama, memo_data, tmp_path, monkeypatch, killed_at, decided
):
    """The decision is timing-dependent; a resume reads it back from RUN/compile.json instead of deciding
    again (here the figures would now say no), and compiles from the step the run it continues did, so its
    weights are bit-identical to the unbroken run's. A run killed before it decided decides at the same step
    when resumed."""
    from transformers import TrainerCallback

    from conftest import crash_at
    from tunelab import compiling, levers

    monkeypatch.setattr(levers, "COMPILE_MIN_PARAMS", 0)
    monkeypatch.setattr(compiling, "COLD_S", {"cpu": 0.0, "cuda": 0.0})  # compiling pays
    monkeypatch.setattr(compiling, "inductor_cache_dir", lambda: tmp_path / "inductor")
    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))

    def cfg(name):
        return tiny_config(tiny_llama, memo_data, tmp_path / name, "lora", max_steps=6, save_steps=2)

    whole = train(cfg("whole"))
    assert whole.summary["levers"]["why"]["compile"].startswith("compiling from step 4")
    (tmp_path / "home" / "compile.json").unlink()  # what the whole run learnt: the killed one decides afresh
    with pytest.raises(KeyboardInterrupt):
        train(cfg("killed"), callbacks=[crash_at(killed_at)])
    # killed in a step's end, before the step's other callbacks: at step 3 before the decision, at step 4 after
    # it; both after checkpoint-2
    assert (tmp_path / "killed" / "compile.json").exists() is decided
    if decided:
        monkeypatch.setattr(compiling, "COLD_S", {"cpu": 1e6, "cuda": 1e6})  # would not pay now
    seen = []

    class Watch(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            seen.append(any(b._compiled_call_impl is not None for b in levers.repeated_blocks(model)))

    resumed = train(cfg("killed"), resume=True, callbacks=[Watch()])
    assert resumed.summary["train"]["resumed_from"] == "checkpoint-2"
    assert resumed.summary["levers"]["why"]["compile"].startswith("compiling from step 4")
    assert seen == [step >= 4 for step in range(3, 7)]  # from checkpoint-2: step 3 eager, as in the whole run
    a, b = final_weights(whole.run_dir), final_weights(resumed.run_dir)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_bf16_checkpoint_loads_its_frozen_weights_straight_into_bf16_and_trains_as_before(
    tiny_llama, memo_data, tmp_path, monkeypatch
):
    """With frozen weights held in bf16 and a checkpoint stored in bf16, the model loads in bf16 (no fp32 copy
    of the frozen weights) and everything else is upcast, exactly. It trains as loading in fp32 and casting
    the frozen weights after does, to bf16 rounding: PEFT creates an adapter in its base layer's dtype
    before upcasting it, so the adapter's random start is rounded to bf16."""
    from tunelab import levers
    from tunelab.models import load_model, load_tokenizer

    bf16_dir = tmp_path / "bf16-model"
    load_model(tiny_llama).to(torch.bfloat16).save_pretrained(bf16_dir)
    load_tokenizer(tiny_llama).save_pretrained(bf16_dir)
    loaded = []
    real = levers.load_dtype
    monkeypatch.setattr(levers, "load_dtype", lambda *a: loaded.append(real(*a)) or loaded[-1])
    runs = {}
    for way in ("straight", "via fp32"):
        if way == "via fp32":
            monkeypatch.setattr(levers, "load_dtype", lambda *a: loaded.append(torch.float32) or torch.float32)
        cfg = tiny_config(
            bf16_dir, memo_data, tmp_path / way.replace(" ", "-"), "lora", max_steps=3, precision="bf16"
        )
        runs[way] = train(cfg)
        assert runs[way].summary["levers"]["frozen_weights"] == "bf16"
    assert loaded == [torch.bfloat16, torch.float32]
    losses = {w: logged_losses(r.run_dir) for w, r in runs.items()}
    assert losses["straight"] == pytest.approx(losses["via fp32"], rel=2e-2)
    a, b = final_weights(runs["straight"].run_dir), final_weights(runs["via fp32"].run_dir)
    assert set(a) == set(b) and all(v.dtype == torch.float32 for v in a.values())  # trained, saved in fp32
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=2e-2, atol=2e-3, msg=k)


def test_upcast_all_but_frozen_linears_keeps_only_the_frozen_linear_weights_in_bf16(tiny_llama):
    from tunelab.levers import upcast_all_but_frozen_linears
    from tunelab.models import load_model

    model = load_model(tiny_llama).to(torch.bfloat16)
    upcast_all_but_frozen_linears(model)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["model.embed_tokens.weight"] == torch.float32 and dtypes["model.norm.weight"] == torch.float32
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    for p in model.parameters():
        p.requires_grad_(False)
    q = model.model.layers[0].self_attn.q_proj.weight
    q.requires_grad_(True)  # a strategy trains it
    upcast_all_but_frozen_linears(model, trained={id(q)})
    assert q.dtype == torch.float32 and model.model.layers[0].self_attn.k_proj.weight.dtype == torch.bfloat16


def test_a_run_hides_the_objects_from_before_it_from_the_garbage_collector_and_gives_them_back(
    tiny_llama, memo_data, tmp_path
):
    """tunelab.runtime.objects_frozen around a run: the cyclic garbage from before the run is collected, not
    frozen with the rest; while the run trains, the objects from before it are out of the collector's walks;
    after the run, also one that failed, they are back; objects someone else froze stay frozen."""
    import gc
    import weakref

    from transformers import TrainerCallback

    class Node:
        pass

    def garbage():  # a reference cycle nothing points to: only the cyclic collector frees it
        a, b = Node(), Node()
        a.other, b.other = b, a
        return weakref.ref(a)

    before, cycle = [object()], garbage()
    seen = {}

    class Look(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen["walked"] = any(o is seen.get("target", before) for o in gc.get_objects())
            seen["cycle"] = cycle()
            raise RuntimeError("stop here")

    assert gc.get_freeze_count() == 0 and cycle() is not None
    with pytest.raises(RuntimeError, match="stop here"):
        train(tiny_config(tiny_llama, memo_data, tmp_path / "run", max_steps=2), callbacks=[Look()])
    assert seen == {"walked": False, "cycle": None}
    assert gc.get_freeze_count() == 0 and any(o is before for o in gc.get_objects())

    gc.freeze()  # a caller's own frozen objects: the run neither freezes more nor thaws them
    try:
        seen.clear()
        seen["target"] = later = [object()]
        with pytest.raises(RuntimeError, match="stop here"):
            train(tiny_config(tiny_llama, memo_data, tmp_path / "run2", max_steps=2), callbacks=[Look()])
        assert seen["walked"] is True  # made after the caller's freeze: not frozen by the run
        assert gc.get_freeze_count() > 0 and not any(o is before for o in gc.get_objects())
        assert any(o is later for o in gc.get_objects())
    finally:
        gc.unfreeze()
