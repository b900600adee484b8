"""Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural Network"):
the model being trained (the student) learns to match a frozen teacher's next-token distributions while it
learns the task.

On each training batch, with student logits ``s`` and teacher logits ``t`` at the positions that predict a
label token, temperature ``T`` and the chosen divergence ``D``::

    loss = α · CE(task) + (1 - α) · T² · mean_tokens D(softmax(t / T), softmax(s / T))

(``T²`` keeps the gradient scale independent of ``T``, Hinton et al. §2). Divergences, per token, with
``p`` the teacher's and ``q`` the student's distribution at temperature ``T``:

- ``forward_kl``: KL(p || q) = Σ p (log p - log q) — mass-covering, the classic choice;
- ``reverse_kl``: KL(q || p) — mode-seeking (MiniLLM, Gu et al., 2024);
- ``jsd``: generalised Jensen-Shannon with weight β (Agarwal et al., 2024, "On-Policy Distillation of
  Language Models", GKD): β·KL(p || m) + (1-β)·KL(q || m), m = β·p + (1-β)·q; bounded, symmetric at 0.5.

**The student** is whatever the run trains:

- (a) a smaller model cut from the teacher by the ``student`` strategy (tunelab.strategies.student:
  ``[full, {name: student, keep_every: 2}, distill]``), trained with ``full``. ``hidden_weight`` adds
  hidden-state alignment: ``1 - cos`` between student block i's output and the output of the teacher block
  it was copied from (which the cut model's blocks say), averaged over tokens and blocks (DistilBERT's
  cosine loss);
- (b) any local model sharing the teacher's tokenizer: the run's ``model``, with ``teacher`` the larger one;
- (c) the teacher's own architecture under LoRA, adapters or any other strategy (adapter + distillation).

**The teacher** (``teacher``: a known model name, a local model directory, a tunelab run dir, or by default
the run's own ``model`` before anything is cut or added) is loaded frozen, in eval mode, held by this
strategy and never by the model, so it receives no gradient and is never saved with the student. A teacher
whose tokenizer or output vocabulary differs from the student's is refused before training.

**Cached teacher** (``top_k: K``): the teacher runs once per distinct training row (the first time it is
seen) and its K largest logits at each label position are kept in memory, so later epochs do not run it.
The loss then uses the teacher's distribution restricted to those K tokens (renormalised): forward KL
against the student's full-vocabulary log-probabilities at those tokens, reverse KL and JSD against the
student's distribution renormalised over the same K tokens. With K = the vocabulary size this is exactly
the live teacher's loss (tested).

**On-policy** (``on_policy: λ``; GKD, Agarwal et al., 2024): a fraction λ of training batches (chosen by the
batch's content, so a resume chooses the same ones) has the student sample completions of the batch's
prompts (``max_new_tokens``, ``sample_temperature``), and the distillation term is taken on those sampled
tokens instead of the dataset's: the student learns from the teacher on its own mistakes. The task loss
still uses the dataset's completions.

When to choose it: to move a model's behaviour into a cheaper one (a smaller student, or a small adapter),
or to learn a task while staying close to a strong model's distribution (distilling from the base model is
the retention loss's idea on task data).
"""

from __future__ import annotations

import zlib
from dataclasses import replace
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from tunelab.errors import RunError
from tunelab.evaluate import autocast, new_tokens
from tunelab.forgetting import divergence, label_positions
from tunelab.strategies.base import (
    SHARDED,
    Need,
    Phase,
    Regularizer,
    StrategyConfig,
    StrategyError,
    register_strategy,
    transformer_blocks,
    unwrap,
)
from tunelab.strategies.capabilities import LossTerm, SetUp, ShardingLimits
from tunelab.strategies.student import teacher_block


class DistillConfig(StrategyConfig):
    teacher: str | None = Field(
        None,
        description="The teacher: a known model name (smollm2-135m-instruct), a local model directory, or a "
        "tunelab run dir (its trained model); default: the run's own model, untouched. Must share the "
        "student's tokenizer.",
    )
    loss: Literal["forward_kl", "reverse_kl", "jsd"] = Field("forward_kl", description="The divergence D.")
    temperature: float = Field(2.0, gt=0, le=20, description="T: both distributions are softened by it.")
    alpha: float = Field(
        0.5, ge=0, le=1, description="Weight of the task loss; the distillation term gets 1 - alpha."
    )
    beta: float = Field(0.5, gt=0, lt=1, description="jsd only: the teacher's weight in the mixture m.")
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="Weight of hidden-state alignment (1 - cos to the teacher block each student block came "
        "from); needs a student cut from the teacher (the student strategy).",
    )
    top_k: int | None = Field(
        None, gt=0, description="Cache the teacher's top-k logits per row: it runs once per row, not each epoch."
    )
    on_policy: float = Field(
        0.0, ge=0, le=1, description="Fraction of batches distilled on completions the student samples itself."
    )
    max_new_tokens: int = Field(32, gt=0, description="on_policy: tokens the student samples per prompt.")
    sample_temperature: float = Field(1.0, gt=0, description="on_policy: the student's sampling temperature.")

    @model_validator(mode="before")
    @classmethod
    def _moved(cls, data):
        moved = [k for k in ("keep_every", "keep_layers") if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(
                f"distill.{moved[0]}: cutting the student is the student strategy's now; write "
                f"[full, {{name: student, {moved[0]}: ...}}, {{name: distill, ...}}]"
            )
        return data


def topk_divergence(student: torch.Tensor, idx: torch.Tensor, t_vals: torch.Tensor, kind, temperature, beta):
    """Per-row divergence to a teacher known only by its top-k logits ``t_vals`` at token ids ``idx`` (see the
    module docstring): ``[N, V]``, ``[N, k]``, ``[N, k]`` -> ``[N]``."""
    log_p = F.log_softmax(t_vals.float() / temperature, -1)
    s_k = student.float().gather(-1, idx)
    if kind == "forward_kl":
        log_q = F.log_softmax(student.float() / temperature, -1).gather(-1, idx)
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    # reverse KL and JSD compare on the teacher's support: the student renormalised over the same tokens
    return divergence(s_k, t_vals, kind, temperature, beta)


def _unpadded(ids: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [row[: int(m.sum())] for row, m in zip(ids, mask, strict=True)]


@register_strategy
class Distill(Regularizer, LossTerm, SetUp, ShardingLimits):
    name = "distill"
    summary = (
        "Regularizer: distill a frozen teacher into the student (KL, reverse KL, JSD; hidden alignment for a "
        "cut student, cached top-k, on-policy)."
    )
    Config = DistillConfig

    declares = replace(Regularizer.declares, needs=frozenset({Need.LOGITS}))  # the student's logits too

    @classmethod
    def check(cls, config, stack) -> None:
        if config.hidden_weight and not any(d.phase is Phase.STRUCTURE for d in stack.declared):
            raise ValueError(
                "distill.hidden_weight aligns a student cut from its teacher with the blocks it came from; add "
                "{name: student, keep_every: k} (or keep_layers), or remove hidden_weight"
            )

    # -- the teacher ------------------------------------------------------------------------------------
    @property
    def uses_teacher(self) -> bool:
        """``alpha: 1`` with no alignment and no on-policy batches is the task loss alone: with a
        ``student`` cut, the same student trained on labels only, and no teacher is loaded."""
        c = self.config
        return c.alpha < 1 or bool(c.hidden_weight) or c.on_policy > 0

    @classmethod
    def distributed_problem(cls, config, mode):
        if config.on_policy > 0 and mode in SHARDED:
            # measured under FSDP2: the processes' gathers fall out of step and gloo aborts
            return (
                "on-policy batches are sampled from the student, and each process stops generating at its own "
                "step, which a sharded model's gathers cannot follow (use ddp, or on_policy: 0)"
            )
        return None

    def prepare(self, model, ctx) -> None:
        c = self.config
        self.teacher = None
        if not self.uses_teacher:
            return
        source = c.teacher or str(ctx.reference.model_dir)
        shown = c.teacher or "(the run's model)"
        try:
            teacher_tok = ctx.load_tokenizer(source) if c.teacher else ctx.tokenizer
        except (FileNotFoundError, RunError) as e:  # ModelNotFound, ModelError: the teacher's, not the run's
            raise StrategyError(f"distill.teacher {shown}: {e}") from None
        if teacher_tok.get_vocab() != ctx.tokenizer.get_vocab():
            raise StrategyError(
                f"distill.teacher {shown}: its tokenizer differs from the student's "
                f"({len(teacher_tok)} vs {len(ctx.tokenizer)} tokens); distillation compares token "
                "distributions, so both must use the same tokenizer"
            )
        try:
            self.teacher = ctx.load_model(source)
        except (FileNotFoundError, RunError) as e:
            raise StrategyError(f"distill.teacher {shown}: {e}") from None
        t_vocab = self.teacher.get_output_embeddings().weight.shape[0]
        s_vocab = model.get_output_embeddings().weight.shape[0]
        if t_vocab != s_vocab:
            raise StrategyError(
                f"distill.teacher {shown}: its output layer has {t_vocab} tokens, the student's {s_vocab}; "
                "both must predict the same vocabulary"
            )
        if c.on_policy and ctx.data_cfg.train_on == "all":
            raise StrategyError(
                "distill.on_policy samples completions of the training prompts; with data.train_on: all the "
                "rows have no prompt (use prompt/completion, chat or classification rows)"
            )
        self.bf16, self.seed = ctx.bf16, ctx.seed
        self.pad_id, self.eos_id = ctx.tokenizer.pad_token_id, ctx.tokenizer.eos_token_id
        self.cache: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.teacher_rows = 0  # rows the teacher has run on (with top_k: each distinct row once)
        self._hidden: dict[str, list[torch.Tensor]] = {"student": [], "teacher": []}
        if c.hidden_weight:
            student_blocks = transformer_blocks(unwrap(model))
            self.kept = [teacher_block(b) for b in student_blocks]  # asked of the cut model itself
            if None in self.kept:
                raise StrategyError(
                    "distill.hidden_weight: the model's blocks were not cut by the student strategy"
                )
            self._capture(student_blocks, "student")
            t_blocks = transformer_blocks(unwrap(self.teacher))
            self._capture([t_blocks[i] for i in self.kept], "teacher")

    def _capture(self, blocks: list[torch.nn.Module], who: str) -> None:
        def hook(module, args, output):
            if who == "teacher" or module.training:
                self._hidden[who].append(output[0] if isinstance(output, tuple) else output)

        for b in blocks:
            b.register_forward_hook(hook)

    def task_loss_weight(self) -> float:
        return self.config.alpha

    @torch.no_grad()
    def _teacher_logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.teacher_rows += ids.shape[0]
        with autocast(ids.device, self.bf16):
            return self.teacher(input_ids=ids, attention_mask=mask).logits

    def _cached(self, inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k (token ids, logits) at the batch's label positions, row by row as
        ``label_positions`` orders them; the teacher runs only for a batch holding an unseen row."""
        ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        keys = [r.cpu().numpy().tobytes() for r in _unpadded(ids, mask)]
        if any(k not in self.cache for k in keys):
            logits = self._teacher_logits(ids, mask)
            k = min(self.config.top_k, logits.shape[-1])
            for i, key in enumerate(keys):
                vals, idx = label_positions(logits[i : i + 1], labels[i : i + 1]).float().topk(k, -1)
                self.cache[key] = (idx.cpu(), vals.cpu())
        device = ids.device
        return (
            torch.cat([self.cache[k][0] for k in keys]).to(device),
            torch.cat([self.cache[k][1] for k in keys]).to(device),
        )

    # -- the loss -----------------------------------------------------------------------------------------
    def loss_terms(self, model, inputs, outputs):
        c = self.config
        if self.teacher is None:
            return {}
        labels = inputs["labels"]
        student_h = self._hidden["student"][-len(self.kept) :] if c.hidden_weight else []
        self._hidden = {"student": [], "teacher": []}
        terms, teacher_ran = {}, False
        if c.on_policy and self._on_policy_batch(inputs):
            terms["kd_on_policy"] = self._on_policy_term(model, inputs)
        else:
            student = label_positions(outputs.logits, labels)
            if c.top_k:
                idx, vals = self._cached(inputs)
                d = topk_divergence(student, idx, vals, c.loss, c.temperature, c.beta)
            else:
                teacher = self._teacher_logits(inputs["input_ids"], inputs["attention_mask"])
                d = divergence(student, label_positions(teacher, labels), c.loss, c.temperature, c.beta)
                teacher_ran = True
            terms["kd"] = (1 - c.alpha) * c.temperature**2 * d.mean()
        if c.hidden_weight:
            if not teacher_ran:  # the teacher's hidden states of this batch's own rows
                self._hidden["teacher"] = []
                self._teacher_logits(inputs["input_ids"], inputs["attention_mask"])
            terms["hidden"] = c.hidden_weight * self._hidden_term(student_h, inputs["attention_mask"])
        self._hidden = {"student": [], "teacher": []}
        return terms

    def _hidden_term(self, student: list[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        teacher = self._hidden["teacher"][-len(self.kept) :]
        keep = mask.bool()
        losses = [
            (1 - F.cosine_similarity(s.float()[keep], t.float()[keep], dim=-1)).mean()
            for s, t in zip(student, teacher, strict=True)
        ]
        return torch.stack(losses).mean()

    def _on_policy_batch(self, inputs) -> bool:
        """Chosen by the batch's content: the same batches are on-policy in a run and in its resume."""
        digest = zlib.crc32(inputs["input_ids"].cpu().numpy().tobytes(), self.seed & 0xFFFFFFFF)
        return digest / 2**32 < self.config.on_policy

    def _on_policy_term(self, model, inputs) -> torch.Tensor:
        c = self.config
        ids, labels = inputs["input_ids"], inputs["labels"]
        prompts = []
        for row, lab in zip(_unpadded(ids, inputs["attention_mask"]), labels, strict=True):
            first = int((lab != -100).nonzero()[0]) if bool((lab != -100).any()) else len(row)
            prompts.append(row[:first])
        seqs, mask, gen_labels = self._rollout(model, prompts)
        out = model(input_ids=seqs, attention_mask=mask)
        student = label_positions(out.logits, gen_labels)
        teacher = label_positions(self._teacher_logits(seqs, mask), gen_labels)
        d = divergence(student, teacher, c.loss, c.temperature, c.beta)
        return (1 - c.alpha) * c.temperature**2 * d.mean()

    @torch.no_grad()
    def _rollout(self, model, prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The student's sampled completions: right-padded ``prompt + completion`` ids, their attention mask,
        and labels that mark the completion tokens (through the first end-of-sequence)."""
        device = prompts[0].device
        was_training = model.training
        model.eval()
        try:
            with autocast(device, self.bf16):
                news = new_tokens(
                    model,
                    prompts,
                    self.config.max_new_tokens,
                    pad_id=self.pad_id,
                    eos_id=self.eos_id,
                    do_sample=True,
                    temperature=self.config.sample_temperature,
                    pure=True,
                )
        finally:
            model.train(was_training)
        rows = [torch.cat([p, new]) for p, new in zip(prompts, news, strict=True)]
        comps = [len(new) for new in news]
        n = max(len(r) for r in rows)
        seqs = torch.full((len(rows), n), self.pad_id, dtype=torch.long, device=device)
        labels, mask = torch.full_like(seqs, -100), torch.zeros_like(seqs)
        for i, (r, k) in enumerate(zip(rows, comps, strict=True)):
            seqs[i, : len(r)], mask[i, : len(r)] = r, 1
            labels[i, len(r) - k : len(r)] = r[len(r) - k :]
        return seqs, mask, labels
