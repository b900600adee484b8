"""Which blocks matter for this task: measured on the task's own rows, not guessed (the choice made from it:
tunelab.strategies.block_choice; ``tunelab layers CONFIG`` runs the measurement alone, tunelab.layers).

Three estimators score every transformer block, and each block's attention and MLP apart where the
estimator can tell them apart. Every score is a per-parameter intensity, so parts of different sizes compare:

- ``grad_norm``: ``‖∇_θ L‖ / ‖θ‖`` over the part's parameters, the gradient of the mean training loss over a
  few batches relative to the weights it would move (the "relative gradient" of AutoFreeze-style freezing);
- ``fisher``: the mean diagonal Fisher ``E[(∂ log p(y|x) / ∂θ_i)²]`` of the part's parameters, from EWC's
  estimator (tunelab.strategies.ewc.estimate_fisher) on the same rows, one at a time;
- ``probe``: each block alone trains ``probe_steps`` AdamW steps on training batches, and the score is the
  drop of the dev split's loss (before minus after); then its weights are put back bit for bit. Blocks only.

The probe is the costly one, and is batched so that only the blocks above the probed one run: the input of
every block is recorded once (one forward pass per batch), and block ``i``'s probe feeds that recorded input
to blocks ``i..L-1`` alone (as ``inputs_embeds``, the blocks below taken out of the list), so its steps and its
dev loss cost ``(L-i)/L`` of a full pass, half on average. Whether the shortcut gives this model's own loss is
checked first, on a dev batch; where it does not (a model that adds position embeddings to its inputs, as
GPT-2 does) the probe runs the whole model, which is slower and gives the same scores.

The dev split is the config's (``data.dev`` / ``data.dev_split``), else ``dev_split: auto`` carved from the
training file with ``data.split_seed``; the eval split is never read. Rows and batches are drawn with
``training.seed``, so a measurement is deterministic for a seed.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data import Collator, batches
from tunelab.evaluate import autocast
from tunelab.models import unwrap
from tunelab.strategies.anatomy import block_list, role, transformer_blocks
from tunelab.strategies.ewc import estimate_fisher

ESTIMATORS = ("grad_norm", "fisher", "probe")
#: the parts scored apart inside a block (norms are too small to choose on their own: they go with their block)
PARTS = ("attention", "mlp")


@dataclass
class Settings:
    """How a measurement is taken; the same settings, model, data and seed give the same scores."""

    estimators: tuple[str, ...] = ESTIMATORS
    rows: int = 32  #: training rows for grad_norm and fisher (and the probe's batches)
    batch_size: int = 8
    probe_steps: int = 3  #: AdamW steps per probed block
    probe_lr: float = 1e-4
    dev_rows: int = 32  #: dev rows the probe's loss is measured on
    seed: int = 0
    shortcut: bool = True  #: the probe runs the upper blocks alone where that gives the model's own logits


@dataclass
class LayerScores:
    """Scores per block (``scores[estimator]["block"][i]``) and per part (``scores[estimator]["attention"]``),
    each part's parameter count (``params``), and what the measurement cost."""

    n_blocks: int
    params: dict[str, list[int]]
    scores: dict[str, dict[str, list[float]]]
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    key: dict[str, Any] = field(default_factory=dict)  #: model, data and settings it was measured on
    shortcut: bool = True  #: the probe ran the upper blocks alone

    def save(self, path: Path) -> None:
        from tunelab.fsutil import write_text_atomic

        write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> LayerScores:
        return cls(**json.loads(Path(path).read_text(encoding="utf-8")))

    def table(self) -> str:
        """One line per block: its parameters, each estimator's score, and grad_norm's attention/MLP split."""
        have = [e for e in ESTIMATORS if e in self.scores]
        head = f"{'block':>5} {'params':>10} " + " ".join(f"{e:>11}" for e in have)
        split = next((e for e in have if "attention" in self.scores[e]), None)
        if split:
            head += f"   {split}: {'attention':>9} {'mlp':>9}"
        lines = [head]
        for i in range(self.n_blocks):
            row = f"{i:>5} {self.params['block'][i]:>10,} " + " ".join(
                f"{self.scores[e]['block'][i]:>11.4g}" for e in have
            )
            if split:
                s = self.scores[split]
                row += f"   {'':>{len(split) + 1}} {s['attention'][i]:>9.3g} {s['mlp'][i]:>9.3g}"
            lines.append(row)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- the model's parts


def block_parts(model: torch.nn.Module) -> list[dict[str, list[torch.nn.Parameter]]]:
    """For every block: all its parameters (``block``) and those of each role (``attention``, ``mlp``,
    ``norms``), asked of its children (tunelab.strategies.anatomy.role)."""
    out = []
    for b in transformer_blocks(unwrap(model)):
        parts: dict[str, list[torch.nn.Parameter]] = {"block": list(b.parameters())}
        for child in b.children():
            r = role(child)
            if r is not None:
                parts.setdefault(r, []).extend(child.parameters())
        out.append(parts)
    return out


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _batches(features: list[dict], settings: Settings, device: str, pad_id: int) -> list[dict]:
    collate = Collator(pad_id)
    return [{n: v.to(device) for n, v in collate(b).items()} for b in batches(features, settings.batch_size)]


def _draw(features: list[dict], n: int, seed: int) -> list[dict]:
    order = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed)).tolist()
    return [features[i] for i in order[:n]]


# ----------------------------------------------------------------------------- the estimators


def _grad_norm(model, parts, batches, bf16: bool) -> dict[str, list[float]]:
    device = batches[0]["input_ids"].device
    for b in batches:
        with autocast(device, bf16):
            loss = model(**b).loss / len(batches)
        loss.backward()

    def rel(params) -> float:
        g = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in params if p.grad is not None))
        w = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params))
        return g / w if w else 0.0

    out = {k: [rel(b.get(k, [])) for b in parts] for k in ("block", *PARTS)}
    model.zero_grad(set_to_none=True)
    return out


def _fisher(model, parts, features, pad_id: int, seed: int, bf16: bool) -> dict[str, list[float]]:
    params = [p for b in parts for p in b["block"]]
    values = estimate_fisher(model, params, features, pad_id, "empirical", seed, bf16)
    fisher = dict(zip(map(id, params), values, strict=True))

    def mean(ps) -> float:
        n = _count(ps)
        return float(sum(fisher[id(p)].double().sum() for p in ps)) / n if n else 0.0

    return {k: [mean(b.get(k, [])) for b in parts] for k in ("block", *PARTS)}


class _Upper:
    """Runs the model from block ``i``'s recorded input: the blocks below are taken out of the model's block
    list for the call, and the input goes in as ``inputs_embeds``."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.owner, self.attr = block_list(unwrap(model))
        self.blocks = getattr(self.owner, self.attr)

    def inputs(self, batches: list[dict], bf16: bool) -> list[list[torch.Tensor]]:
        """Each block's input for each batch: ``inputs[i][b]``."""
        seen: list[list[torch.Tensor]] = [[] for _ in self.blocks]

        def keep(i):
            def hook(module, args, kwargs):
                h = args[0] if args else kwargs["hidden_states"]
                seen[i].append(h.detach())

            return hook

        handles = [b.register_forward_pre_hook(keep(i), with_kwargs=True) for i, b in enumerate(self.blocks)]
        try:
            with torch.no_grad():
                for b in batches:
                    with autocast(b["input_ids"].device, bf16):
                        self.model(**b)
        finally:
            for h in handles:
                h.remove()
        return seen

    def run(self, i: int, h: torch.Tensor, batch: dict, bf16: bool):
        setattr(self.owner, self.attr, torch.nn.ModuleList(list(self.blocks)[i:]))
        try:
            with autocast(h.device, bf16):
                return self.model(inputs_embeds=h, attention_mask=batch["attention_mask"], labels=batch["labels"])
        finally:
            setattr(self.owner, self.attr, self.blocks)

    def same_as_whole(self, i: int, h: torch.Tensor, batch: dict, bf16: bool) -> bool:
        """Whether running from block ``i`` gives the whole model's logits on ``batch`` (``h``: its recorded
        input), to float rounding."""
        with torch.no_grad(), autocast(h.device, bf16):
            whole = self.model(**batch).logits.float()
        short = self.run(i, h, batch, bf16).logits.float()
        tol = (1e-2 if bf16 else 1e-4) * float(whole.abs().max())
        return bool((whole - short).abs().max() <= tol)


def _probe(model, parts, train_batches, dev_batches, settings: Settings, bf16: bool) -> tuple[list[float], bool]:
    """Each block alone trains ``probe_steps`` steps; its score is the dev loss drop. Returns the scores and
    whether the upper-blocks shortcut was used."""
    upper = _Upper(model)
    n = len(parts)
    dev_in = upper.inputs(dev_batches, bf16)
    train_in = upper.inputs(train_batches, bf16)
    with torch.no_grad(), autocast(dev_batches[0]["input_ids"].device, bf16):
        before = sum(float(model(**b).loss) for b in dev_batches) / len(dev_batches)
    shortcut = settings.shortcut and upper.same_as_whole(n // 2, dev_in[n // 2][0], dev_batches[0], bf16)

    def loss(i: int, k: int, batches, recorded) -> torch.Tensor:
        if shortcut:
            return upper.run(i, recorded[i][k], batches[k], bf16).loss
        with autocast(batches[k]["input_ids"].device, bf16):
            return model(**batches[k]).loss

    scores = []
    for i in range(n):
        params = parts[i]["block"]
        kept = [p.detach().clone() for p in params]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=settings.probe_lr, weight_decay=0.0)
        for step in range(settings.probe_steps):
            k = step % len(train_batches)
            loss(i, k, train_batches, train_in).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            after = sum(float(loss(i, k, dev_batches, dev_in)) for k in range(len(dev_batches))) / len(dev_batches)
        scores.append(before - after)
        with torch.no_grad():
            for p, v in zip(params, kept, strict=True):
                p.copy_(v)
                p.requires_grad_(False)
        del opt
    return scores, shortcut


def measure(
    model: torch.nn.Module,
    train: list[dict],
    dev: list[dict],
    pad_id: int,
    settings: Settings,
    bf16: bool = False,
    key: dict[str, Any] | None = None,
    say=None,
) -> LayerScores:
    """Score every block of ``model`` (untouched: its weights and trainable flags are as found afterwards) on
    ``train`` rows and, for the probe, ``dev`` rows (tokenized rows with labels)."""
    device = next(model.parameters()).device
    parts = block_parts(model)
    rows = _draw(train, settings.rows, settings.seed)
    dev_rows = _draw(dev, settings.dev_rows, settings.seed + 1)
    train_batches = _batches(rows, settings, device, pad_id)
    dev_batches = _batches(dev_rows, settings, device, pad_id)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was = model.training
    model.eval()  # no dropout: the scores of the deterministic model
    scores: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, float] = {}
    shortcut = True
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for est in settings.estimators:
            if say:
                say(f"measuring the blocks: {est}")
            t = time.perf_counter()
            if est == "probe":  # trains one block at a time itself
                probe, shortcut = _probe(model, parts, train_batches, dev_batches, settings, bf16)
                scores[est] = {"block": probe}
            else:  # the gradient estimators: of every block's weights at once
                for b in parts:
                    for p in b["block"]:
                        p.requires_grad_(True)
                if est == "grad_norm":
                    scores[est] = _grad_norm(model, parts, train_batches, bf16)
                else:
                    scores[est] = _fisher(model, parts, rows, pad_id, settings.seed, bf16)
            seconds[est] = round(time.perf_counter() - t, 2)
            for p in model.parameters():
                p.requires_grad_(False)
    finally:
        for p, f in flags:
            p.requires_grad_(f)
            p.grad = None
        model.train(was)
    params = {k: [_count(b.get(k, [])) for b in parts] for k in ("block", *PARTS, "norms")}
    return LayerScores(len(parts), params, scores, seconds, asdict(settings), key or {}, shortcut)
