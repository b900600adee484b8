"""The run configuration: one schema for YAML files, ``--set`` overrides and the Python API.

A config is validated completely before any model loads. Every problem is reported at once, each naming
the key path, the YAML file and line where the key stands, what was given and what is allowed::

    cfg.yaml:12: training.lr: Input should be greater than 0 (got -1)
    cfg.yaml:4: data.formt: unknown key; allowed: train, eval, ... (did you mean 'format'?)

Strategy options are validated by the config class that each strategy registers (see
``tunelab.strategies``), so the schema grows with the registry and the engine never names a strategy.

Long because it is the one schema: every section's fields with their help texts (half the file), and the
loading that gives errors their file, line and did-you-mean. Splitting the sections from their loader would
put the schema in two places.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from tunelab.schema import StrictModel
from tunelab.trackers import TRACKER_PACKAGES

DEFAULT_MODEL = "smollm2-135m-instruct"


#: transformers' reporting integrations (transformers.integrations.INTEGRATION_TO_CALLBACK), as
#: tunelab.trackers lists them with the package each needs
Tracker = Literal[tuple(TRACKER_PACKAGES)]  # type: ignore[valid-type]


class ConfigError(ValueError):
    """A config that cannot be used. ``problems`` holds one human-readable line per problem."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        self.source = source
        head = f"invalid config {source}" if source else "invalid config"
        super().__init__(head + ":\n  " + "\n  ".join(problems))


class Strict(StrictModel):
    """Base for every config section: unknown keys fail, values are re-validated on assignment, no boolean
    is read as a number (tunelab.schema)."""


class DataConfig(Strict):
    train: str = Field(description="Training file: .jsonl, .json, .csv or .parquet (loaded with `datasets`).")
    eval: str | None = Field(None, description="Optional evaluation file, same shape as `train`.")
    eval_split: float | None = Field(
        None, gt=0, lt=1, description="Hold out this fraction of `train` for evaluation when `eval` is not given."
    )
    dev: str | None = Field(
        None,
        description="Optional dev file, same shape as `train`: what a comparison's search chooses on (learning "
        "rate, rank, prompt, survivors), so that the eval split only gives the verdict.",
    )
    dev_split: float | int | Literal["auto"] | None = Field(
        None,
        description="Carve a dev split from `train` when `dev` is not given: a fraction (0.1), a number of rows "
        "(200), or auto (10% of train, at least 20 rows and at most 500). The rows are left out of training. "
        "A comparison with a search sets auto unless its base gives one.",
    )
    split_seed: int = Field(
        0,
        description="Seed of the rows eval_split and dev_split carve out; independent of training.seed, so "
        "every seed of a comparison is scored on the same rows.",
    )
    format: Literal["auto", "text", "prompt_completion", "messages", "classification"] = Field(
        "auto",
        description="Row shape. auto: `messages` if present, else `prompt`+`completion`, else `text`+`label` "
        "(classification), else `text` (language modelling).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename columns of your file to tunelab's names, e.g. {prompt: question, completion: answer}.",
    )
    template: Literal["auto", "chat", "plain"] = Field(
        "auto",
        description="How prompt/completion and classification rows are rendered: `chat` uses the tokenizer's "
        "chat template (user turn, assistant turn), `plain` concatenates; auto = chat when the tokenizer has one.",
    )
    system_prompt: str | None = Field(None, description="System message added to chat-rendered rows.")
    instruction: str = Field(
        "Classify the following text. Answer with one of: {labels}.\n\n{text}",
        description="Prompt for classification rows; {text} is the row's text, {labels} the sorted label set.",
    )
    train_on: Literal["completion", "all"] = Field(
        "completion",
        description="Tokens that carry loss: only completion/assistant tokens (default), or every token.",
    )
    skip_bad_rows: bool = Field(
        False, description="Skip malformed rows (counted in the run summary) instead of failing on the first one."
    )
    streaming: bool | Literal["auto"] = Field(
        "auto",
        description="Train from the file as it is read (.jsonl, .csv, .parquet), without preparing it first: for "
        "files bigger than memory. Blocks of rows are read in a shuffled order, through a shuffle buffer, "
        "length-grouped; a resume reads the stream again up to its checkpoint. auto: stream a file over half "
        "the machine's memory. mode single only.",
    )
    shuffle_buffer: int = Field(
        10_000,
        gt=0,
        description="data.streaming: rows held in the shuffle buffer (each about 1 KB per 100 tokens).",
    )

    @model_validator(mode="after")
    def _one_eval_source(self) -> DataConfig:
        if self.eval is not None and self.eval_split is not None:
            raise ValueError("give either data.eval (a file) or data.eval_split (a fraction of train), not both")
        if self.dev is not None and self.dev_split is not None:
            raise ValueError("give either data.dev (a file) or data.dev_split (carved from train), not both")
        d = self.dev_split
        if isinstance(d, float) and not 0 < d < 1 or isinstance(d, int) and not isinstance(d, bool) and d < 1:
            raise ValueError(
                f"dev_split: {d}: give a fraction between 0 and 1, a number of rows (1 or more) or auto"
            )
        return self

    @field_validator("columns")
    @classmethod
    def _known_targets(cls, v: dict[str, str]) -> dict[str, str]:
        allowed = {"text", "prompt", "completion", "messages", "label"}
        bad = sorted(set(v) - allowed)
        if bad:
            raise ValueError(f"unknown target column(s) {bad}; allowed: {sorted(allowed)}")
        return v


class TrainingConfig(Strict):
    epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (ignored when max_steps or max_tokens is set)."
    )
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    max_tokens: int | None = Field(
        None,
        gt=0,
        description="Budget in tokens: stop once this many non-padding training tokens have been seen (all "
        "processes together). Without max_steps, the schedule runs over the steps this budget takes at the "
        "data's mean tokens per step.",
    )
    batch_size: int = Field(8, gt=0, description="Examples per device per forward pass.")
    grad_accum: int = Field(1, gt=0, description="Forward passes accumulated per optimizer step.")
    lr: float | None = Field(
        None, gt=0, le=1, description="Peak learning rate; default: the strategy's own (full 2e-5, lora 2e-4)."
    )
    schedule: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after warmup."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps.")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="Warmup as a fraction of all steps (if > 0).")
    weight_decay: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Decoupled (AdamW) weight decay, 0 to 1 (0.01-0.1 is usual; each step shrinks weights by lr x "
        "this, so larger values only destroy the model).",
    )
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping norm; 0 disables clipping.")
    seed: int = Field(42, description="Seed for weights of new modules, data order and dropout.")
    max_length: int = Field(512, ge=8, description="Tokens per example; longer rows are truncated on the right.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="auto: bf16 mixed precision on CUDA with bf16 and on CPUs with AVX512-BF16/AMX, else fp32.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")
    loss_head: Literal["auto", "full", "positions"] = Field(
        "auto",
        description="positions: apply the vocabulary head and the loss only where a label is (chunked; same loss "
        "and gradients); full: at every position. auto: positions unless a strategy reads the batch's logits "
        "(distill) or the model changes its logits after the head.",
    )
    frozen_weights: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="Dtype of frozen linear weights. bf16: held in bf16 (autocast casts them every step "
        "otherwise; same arithmetic, half the memory). auto: bf16 under bf16 precision unless a strategy changes "
        "base weights.",
    )
    optimizer_impl: Literal["auto", "fused", "foreach", "for_loop"] = Field(
        "auto", description="AdamW implementation; auto: fused."
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Compile each repeated block of the model (its decoder layers) with torch.compile for "
        "training: fused element-wise work, fewer saved activations. auto, for models of at least 50M "
        "parameters where a compiler is present (a C++ compiler on CPU, triton on CUDA): compiled when the "
        "time it is expected to save over the run beats the time it is expected to take, cold or warm "
        "(measured on this machine by earlier runs; inductor caches kernels in TORCHINDUCTOR_CACHE_DIR).",
    )
    allocator: Literal["auto", "reuse", "system"] = Field(
        "auto",
        description="What the C allocator (glibc) does with the memory a training step frees: reuse keeps it "
        "in the process for the next step (no mmap for large blocks, no trimming) instead of handing it back "
        "to the system and faulting it in again; handed back when training ends. auto: reuse on CPU under "
        "glibc (the tunelab command runs under tcmalloc or jemalloc where installed, which keep freed memory "
        "by size themselves: then system; TUNELAB_MALLOC chooses).",
    )
    threads: int | None = Field(
        None, gt=0, description="Intra-op CPU threads; default: torch's (the physical cores)."
    )
    attention: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto",
        description="Attention implementation; auto: flash_attention_2 on CUDA when the flash-attn package is "
        "installed, else sdpa (PyTorch's fused attention) on CUDA and eager on CPU (faster there).",
    )
    attention_probs: Literal["auto", "recompute", "keep"] = Field(
        "auto",
        description="What eager attention does with its probabilities (the softmax over every query and key) "
        "for backward: keep them, or recompute them there from the query, key and value (same gradients; the "
        "attention's forward runs once more). auto: recompute under eager attention unless "
        "gradient_checkpointing recomputes whole blocks already.",
    )
    pad_to: Literal["auto", "bucket", "longest"] = Field(
        "auto",
        description="How far a training batch is padded: longest, to its own longest row; bucket, a batch of 32 "
        "tokens or more further, to the next multiple of 8 up to 256 tokens, of 16 up to 512, of 32 up to 1024, "
        "... (16 lengths per doubling; at most max_length), so that batch shapes repeat and the allocator reuses "
        "the memory of earlier steps instead of growing with every new length (padding carries no loss and is "
        "not counted in tokens/s). auto: bucket.",
    )
    weight_casts: Literal["keep", "recompute"] = Field(
        "keep",
        description="What mixed precision does with the bf16/fp16 copy of each trained weight that backward "
        "needs: keep it from the forward (a half-size copy of every trained weight through the step), or cast "
        "the weight again in backward (the same values, one cast more): less memory with full or layer-wise "
        "fine-tuning (2% of the peak on the demo's tickets, default model) for some speed (5-7% fewer tokens/s "
        "in one run, within the run-to-run spread).",
    )
    activations: Literal["auto", "lean", "keep"] = Field(
        "auto",
        description="What autograd keeps of the activations backward needs. keep: each as the forward made "
        "it. lean: an element-wise output whose inputs are kept anyway (SiLU's output in a gated MLP, the gated "
        "product, RMSNorm's normalised input when its weight trains) is computed again in backward, and the "
        "casts of one tensor to one dtype (the bf16 input that the query, key and value projections each cast) "
        "are kept once: the same values, bit for bit, for one element-wise op more per output. auto: lean.",
    )
    lora_kernel: Literal["auto", "fused", "peft"] = Field(
        "auto",
        description="How a LoRA-adapted linear layer trains: peft, PEFT's own forward (the base layer, A, B, the "
        "scale and the sum as separate operators, the input cast for each); fused, one operation for the layer "
        "(the adapter's product added into the base's by the matmul, the input cast once for the layers that "
        "read it): PEFT's arithmetic up to rounding, for fewer passes over the activations. Evaluation and "
        "generation run PEFT's forward either way. auto: fused, unless compile: on (inductor fuses them itself) "
        "or the weights are sharded.",
    )
    base_quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="Load the frozen base weights quantized (QLoRA: 4bit NF4 with double quantization and bf16 "
        "compute; or 8bit) through bitsandbytes (pip install 'tunelab[qlora]'). CUDA only; for strategies that "
        "add modules (LoRA, adapters, prompt learning), not for those that change base weights.",
    )
    report_to: list[Tracker] = Field(
        ["tensorboard"],
        description="Experiment trackers the Trainer reports to (transformers' integrations; each needs its "
        "package, e.g. pip install mlflow): tensorboard (into RUN/tb), mlflow (MLFLOW_TRACKING_URI, by default "
        "RUN/mlruns), wandb, comet_ml, clearml, dvclive, neptune, trackio, swanlab, ...; [] for none. "
        "metrics.jsonl is written whatever this says.",
    )
    distributed: Literal["auto", "ddp", "fsdp", "deepspeed"] = Field(
        "auto",
        description="How several processes (torchrun / accelerate launch) share the training: ddp (each holds the "
        "whole model, the batch is split), fsdp (FSDP2: weights, gradients and optimizer state sharded per "
        "decoder layer; CPU and CUDA), deepspeed (ZeRO, training.zero_stage; CUDA, pip install deepspeed). auto: "
        "what an accelerate launch config says, else ddp. fsdp and deepspeed checkpoints are sharded, one file "
        "per process (docs/distributed.md).",
    )
    zero_stage: Literal[2, 3] | None = Field(
        None,
        description="distributed: deepspeed only (default 3). 2: gradients and optimizer state sharded; 3: the "
        "weights too.",
    )
    logging_steps: int = Field(10, gt=0, description="Log loss, learning rate and tokens/s every N steps.")
    save_steps: int = Field(200, gt=0, description="Write a resumable checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Checkpoints kept (oldest deleted first).")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate eval loss every N steps (default: at the end)."
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> TrainingConfig:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError("give either training.warmup_steps or training.warmup_ratio, not both")
        return self

    @model_validator(mode="after")
    def _sharding_levers(self) -> TrainingConfig:
        """tunelab's own memory levers act on whole weights, which a sharded process does not hold."""
        if self.zero_stage is not None and self.distributed != "deepspeed":
            raise ValueError(f"training.zero_stage is for distributed: deepspeed (this is {self.distributed})")
        from tunelab.strategies import SHARDED

        if self.distributed not in SHARDED:
            return self
        refused = [  # (key, value, why, what to use instead)
            ("loss_head", "positions", "it applies the output layer outside the forward pass, unsharded", "auto"),
            ("frozen_weights", "bf16", "the sharding engine holds one dtype for a layer's weights", "auto"),
            ("compile", "on", "compiling sharded layers is not measured yet", "auto"),
            ("lora_kernel", "fused", "it reads whole weights in the layer's forward", "auto"),
            ("base_quantization", "4bit", "quantized base weights are not sharded here", "none"),
            ("base_quantization", "8bit", "quantized base weights are not sharded here", "none"),
        ]
        for key, value, why, instead in refused:
            if getattr(self, key) == value:
                raise ValueError(
                    f"training.{key}: {value} cannot be used with distributed: {self.distributed} ({why}); "
                    f"use {instead}, or distributed: ddp"
                )
        return self


MetricName = Literal[
    "exact_match", "accuracy", "macro_f1", "chrf", "bleu", "rouge_l", "json_fields"
]  # tunelab.metrics.NAMES


class EvalConfig(Strict):
    before: bool = Field(
        False, description="Also score the untouched model before training (summary: before/after)."
    )
    max_new_tokens: int = Field(32, gt=0, description="Tokens generated per eval prompt for exact match/accuracy.")
    batch_size: int = Field(16, gt=0, description="Prompts generated at once.")
    max_examples: int | None = Field(None, gt=0, description="Score only the first N eval rows (default all).")
    split: Literal["eval", "dev"] = Field(
        "eval",
        description="The split a run is scored on: eval (the verdict), or dev (data.dev / data.dev_split: what a "
        "search chooses on; the eval file is then never opened).",
    )
    metrics: list[MetricName] | None = Field(
        None,
        min_length=1,
        description="Metrics of the generated answers: exact_match, accuracy, macro_f1, chrf, bleu (sacrebleu), "
        "rouge_l (rouge-score), json_fields (per-field accuracy of JSON answers). Default by the data's shape: "
        "labels -> accuracy, macro_f1; JSON answers -> exact_match, json_fields; free text -> chrf, bleu, "
        "rouge_l, exact_match; short answers -> exact_match, chrf.",
    )
    primary: MetricName | None = Field(
        None, description="The metric that ranks a comparison and heads the summary (default: the first metric)."
    )


class ForgettingConfig(Strict):
    enabled: bool = Field(True, description="Measure forgetting against the base model after training.")
    builtin: bool = Field(True, description="Use tunelab's built-in general prompts as the retention set.")
    file: str | None = Field(None, description="Extra retention prompts: a file with a `prompt` column.")
    max_new_tokens: int = Field(32, gt=0, description="Length of the base answers used as references.")
    original_tasks: list[str] = Field(
        default_factory=list,
        description="Eval files of the model's original tasks (with references), scored before and after.",
    )

    @model_validator(mode="after")
    def _some_prompts(self) -> ForgettingConfig:
        if self.enabled and not self.builtin and not self.file:
            raise ValueError("forgetting needs retention prompts: builtin: true or a file")
        return self


class TaskConfig(DataConfig):
    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$",
        description="Task name (letters, digits, _ and -): names its scores, logs and per-task parts.",
    )
    weight: float = Field(
        1.0, gt=0, description="mode: multitask only: factor on this task's loss (its rows' task loss)."
    )


class MultitaskConfig(Strict):
    sampling: Literal["proportional", "uniform", "temperature", "round_robin"] = Field(
        "proportional",
        description="Which task each batch comes from: proportional to the tasks' sizes, uniform, temperature "
        "(probability proportional to size^(1/T)), or round_robin (tasks in turn).",
    )
    temperature: float = Field(
        2.0, ge=1, le=100, description="T for sampling: temperature (1 = proportional, large = uniform)."
    )


class ContinualConfig(Strict):
    per_task_adapter: bool = Field(
        False,
        description="Train a fresh copy of the strategy (e.g. one LoRA) per task on the base model and route each "
        "task's evaluation to its own adapter (task identity known at test time).",
    )


class RunConfig(Strict):
    """What every run's config holds. A config is one of its modes' classes (:class:`SingleRunConfig`,
    :class:`MultitaskRunConfig`, :class:`ContinualRunConfig`: a union discriminated by ``mode``), so the
    options of one mode exist only in it; ``RunConfig.model_validate`` picks the class."""

    _source: str | None = PrivateAttr(None)  #: the YAML file it was read from (for errors found later)

    mode: Literal["single", "continual", "multitask"] = Field(
        None,
        validate_default=False,
        description="How to train (tunelab.modes): `single` (one training set: `data`), `continual` (`tasks` in "
        "sequence) or `multitask` (`tasks` together). Default: continual when `tasks` is given, else single.",
    )
    model: str = Field(
        DEFAULT_MODEL, description=f"A known model name ({DEFAULT_MODEL}) or a local Hugging Face model directory."
    )
    allow_pickle: bool = Field(
        False,
        description="Allow a model directory whose weights are pickled (.bin, .pt, ...). Unpickling can run code "
        "stored in the file: only for files you trust; converting them to safetensors is better.",
    )
    data: DataConfig | None = Field(None, description="The training data (or `tasks` for continual learning).")
    tasks: list[TaskConfig] | None = Field(
        None,
        description="Named tasks, each with its own train and eval data: trained in order (continual) or "
        "together (multitask).",
    )
    forgetting: ForgettingConfig = Field(default_factory=ForgettingConfig)
    strategy: list[Any] = Field(
        default_factory=lambda: [{"name": "lora"}],
        validate_default=True,
        description="A strategy name (`lora`), a mapping with `name` and its options, or a list of those.",
    )
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    output_dir: str = Field("runs/latest", description="Run directory; must not hold another run (see --resume).")

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> RunConfig:
        if cls is RunConfig:  # the union: the mode's own class
            return _RUN.validate_python(obj, *args, **kwargs)
        return super().model_validate(obj, *args, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _default_mode(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and raw.get("mode") is None:
            raw = {**raw, "mode": _mode_of(raw)}
        if isinstance(raw, dict):  # a section of another mode: refused, unless it only says the defaults
            for section, model in MODE_SECTIONS.items():
                if section in raw and raw["mode"] != section:
                    if _is_default(model, raw[section]):
                        raw = {k: v for k, v in raw.items() if k != section}  # e.g. an older run's config.yaml
                        continue
                    given = raw[section] if isinstance(raw[section], dict) else {}
                    keys = ", ".join(f"{section}.{k}" for k in sorted(given)) or section
                    raise ValueError(f"{keys}: only mode: {section} uses it (this run's mode is {raw['mode']})")
        return raw

    @model_validator(mode="after")
    def _data_or_tasks(self) -> RunConfig:
        if (self.data is None) == (self.tasks is None):
            raise ValueError("give either data (one training set) or tasks (a sequence, for continual learning)")
        wants = "data" if self.mode == "single" else "tasks"
        if getattr(self, wants) is None:
            raise ValueError(f"mode: {self.mode} trains on `{wants}`; give it, or the mode that fits your data")
        if self.tasks is not None:
            names = [t.name for t in self.tasks]
            if len(self.tasks) < 2 or len(set(names)) != len(names):
                raise ValueError(f"tasks needs at least two tasks with distinct names, got {names}")
            if any(t.eval is None and t.eval_split is None for t in self.tasks):
                raise ValueError("every task needs eval data (eval or eval_split): each task is scored")
            weighted = [t.name for t in self.tasks if t.weight != 1.0]
            if weighted and self.mode != "multitask":
                raise ValueError(f"tasks {weighted} set a loss weight, which only mode: multitask uses")
        if self.eval.split == "dev" and (
            self.mode != "single" or (self.data.dev is None and not self.data.dev_split)
        ):
            raise ValueError(
                "eval.split: dev scores a run on its dev split: give data.dev or data.dev_split (mode: single)"
            )
        from tunelab.strategies.base import is_baseline

        if is_baseline(self.strategy) and self.mode != "single":
            raise ValueError(
                f"{self.strategy[0].name} scores one eval set without training: it runs in mode: single only"
            )
        if self.tasks is not None and any(t.streaming is True for t in self.tasks):
            raise ValueError(
                f"tasks: streaming: true: mode {self.mode} prepares each task whole; streaming is for mode single"
            )
        per_task = [s.name for s in self.strategy if getattr(s, "per_task", False)]
        if per_task and self.mode == "single":
            raise ValueError(
                f"strategy {', '.join(per_task)}: per_task gives one copy per task of a multi-task run; "
                f"this run's mode is {self.mode} (set mode: multitask with tasks, or per_task: false)"
            )
        return self

    @model_validator(mode="after")
    def _nothing_ignored(self) -> RunConfig:
        """Options this run would accept and then ignore, or refuse only once the model has loaded: refused
        here, before anything loads, each naming its key."""
        from tunelab.strategies.base import check_in_mode, get_strategy

        check_in_mode(self.strategy, self.mode)
        if self.data is not None and self.data.streaming is True:
            from tunelab.strategies.base import DataHook

            hooks = [s.name for s in self.strategy if issubclass(get_strategy(s.name), DataHook)]
            if hooks:
                raise ValueError(
                    f"data.streaming: true: {', '.join(hooks)} changes the training rows before training, which "
                    "needs them all at hand; remove data.streaming (or set it to false)"
                )
        if self.training.frozen_weights == "bf16":
            if self.training.precision == "fp32":
                raise ValueError("training.frozen_weights: bf16 needs training.precision bf16 or auto, not fp32")
            changing = [s.name for s in self.strategy if get_strategy(s.name).declare(s).changes_base_weights]
            if changing:
                raise ValueError(
                    f"training.frozen_weights: bf16 cannot be used with {', '.join(changing)}, which changes base "
                    "weights: the model it saves carries the frozen weights at their own precision; use auto or "
                    "fp32"
                )
        return self

    @model_validator(mode="after")
    def _distributable(self) -> RunConfig:
        mode = self.training.distributed
        if mode == "auto":
            return self  # the launch decides; the run checks what it chose (tunelab.session)
        from tunelab.strategies import check_distributed

        check_distributed(self.strategy, mode)
        return self

    @field_validator("strategy", mode="before")
    @classmethod
    def _build_strategies(cls, value: Any) -> list[Any]:
        from tunelab.strategies import validate_strategy_specs

        return validate_strategy_specs(value)

    def strategy_names(self) -> list[str]:
        return [s.name for s in self.strategy]

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written to ``config.yaml`` beside every output (strategy options included)."""
        d = self.model_dump(mode="json")
        d["strategy"] = [s.model_dump(mode="json") for s in self.strategy]
        return d


class SingleRunConfig(RunConfig):
    mode: Literal["single"] = Field("single", description=RunConfig.model_fields["mode"].description)


class MultitaskRunConfig(RunConfig):
    mode: Literal["multitask"] = Field("multitask", description=RunConfig.model_fields["mode"].description)
    multitask: MultitaskConfig = Field(default_factory=MultitaskConfig)


class ContinualRunConfig(RunConfig):
    mode: Literal["continual"] = Field("continual", description=RunConfig.model_fields["mode"].description)
    continual: ContinualConfig = Field(default_factory=ContinualConfig)

    @model_validator(mode="after")
    def _one_copy_per_task(self) -> ContinualRunConfig:
        """``continual.per_task_adapter`` is the strategies' own per-task mechanism (``per_task: true``, as in
        multi-task runs): every training component keeps a copy per task, and each task trains and is scored
        on its own; set here, so the resolved config says it."""
        from tunelab.strategies.base import PerTaskConfig, get_strategy

        if not self.continual.per_task_adapter:
            per_task = [c.name for c in self.strategy if getattr(c, "per_task", False)]
            if per_task:
                raise ValueError(
                    f"continual.per_task_adapter: strategy {', '.join(per_task)} sets per_task, which mode: "
                    "continual takes from continual.per_task_adapter: true"
                )
            return self
        trains = [c for c in self.strategy if get_strategy(c.name).declare(c).trains]
        cannot = [c.name for c in trains if not isinstance(c, PerTaskConfig)]
        if cannot:
            raise ValueError(
                "continual.per_task_adapter needs strategies that keep one copy per task (lora, ia3, peft, "
                f"adapters, prefix, prompt, ptuning); {', '.join(cannot)} cannot (it changes the base weights)"
            )
        for i, c in enumerate(self.strategy):  # in place: assigning the field would validate the model again
            if c in trains:
                self.strategy[i] = c.model_copy(update={"per_task": True})
        return self

    @model_validator(mode="after")
    def _continual_scores(self) -> ContinualRunConfig:
        if self.forgetting.original_tasks:
            raise ValueError(
                "forgetting.original_tasks: mode: continual does not score them; it scores every task of the "
                "sequence before and after each one (continual.json). Score original tasks in mode single or "
                "multitask, or give them as tasks"
            )
        if self.training.eval_steps:
            raise ValueError(
                "training.eval_steps: mode: continual scores each task once it is trained, not during training; "
                "remove it"
            )
        from tunelab.strategies import SHARDED

        if self.training.distributed in SHARDED:
            raise ValueError(
                f"training.distributed: {self.training.distributed} is for mode single and multitask; continual "
                "learning trains task after task on one model: use ddp"
            )
        return self


#: the options only one mode has, by the mode's name
MODE_SECTIONS: dict[str, type[BaseModel]] = {"continual": ContinualConfig, "multitask": MultitaskConfig}
#: the config classes by mode
MODE_CONFIGS: dict[str, type[RunConfig]] = {
    "single": SingleRunConfig,
    "multitask": MultitaskRunConfig,
    "continual": ContinualRunConfig,
}


def _mode_of(raw: Any) -> str:
    """The mode a config states, or its default (continual when ``tasks`` is given, else single)."""
    mode = raw.get("mode") if isinstance(raw, dict) else getattr(raw, "mode", None)
    if mode is None:
        tasks = raw.get("tasks") if isinstance(raw, dict) else getattr(raw, "tasks", None)
        return "continual" if tasks is not None else "single"
    return mode if isinstance(mode, str) and mode in MODE_CONFIGS else "single"  # an unknown one: refused there


def _is_default(model: type[BaseModel], value: Any) -> bool:
    try:
        return model.model_validate(value if value is not None else {}) == model()
    except ValidationError:
        return False


_RUN: TypeAdapter = TypeAdapter(
    Annotated[
        Annotated[SingleRunConfig, Tag("single")]
        | Annotated[MultitaskRunConfig, Tag("multitask")]
        | Annotated[ContinualRunConfig, Tag("continual")],
        Discriminator(_mode_of),
    ]
)


# ----------------------------------------------------------------------------- loading


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in a config tree. List items (the strategies of a hybrid) are reached by index
    (``strategy.1.r``) or by strategy name (``strategy.lora.r``); a one-item list also by its keys
    (``strategy.r``). A strategy given as a bare name becomes ``{name: ...}`` when a key is set inside it."""
    keys = dotted.split(".")
    node: Any = tree
    for i, k in enumerate(keys):
        where, last = ".".join(keys[:i]), i == len(keys) - 1
        if isinstance(node, list):
            idx = _list_index(node, k, dotted, where)
            through = idx is None  # a one-item list reached by its item's keys: k applies to the item
            idx = 0 if through else idx
            if last and not through:
                node[idx] = value
                return
            if isinstance(node[idx], str):
                node[idx] = {"name": node[idx]}  # a strategy given by name
            node = node[idx]
            if not through:
                continue
        if not isinstance(node, dict):
            raise ConfigError([f"--set {dotted}: {where} is {node!r}, not a mapping; cannot set {k!r} inside it"])
        if last:
            node[k] = value
            return
        if k == "strategy" and isinstance(node.get(k), str | dict):
            node[k] = [node[k]]  # `strategy: lora` is a one-item list: strategy.r, strategy.0.r, strategy.lora.r
        node = node.setdefault(k, {})


def _list_index(items: list, key: str, dotted: str, where: str) -> int | None:
    """The item ``key`` names (an index or a strategy name); None for the only item of a one-item list."""
    names = [it if isinstance(it, str) else it.get("name") if isinstance(it, dict) else None for it in items]
    if key.lstrip("-").isdigit():
        if 0 <= int(key) < len(items):
            return int(key)
        problem = f"index {key} is out of range ({where} has {len(items)} item(s): 0..{len(items) - 1})"
    elif names.count(key) == 1:
        return names.index(key)
    elif names.count(key) > 1:
        problem = f"{key!r} names {names.count(key)} items of {where}; use the index"
    elif len(items) == 1:
        return None
    else:
        problem = f"{key!r} is neither an index nor a name in {where} (names: {', '.join(map(str, names))})"
    forms = f"reach an item by index ({where}.0.KEY=VALUE) or by name ({where}.NAME.KEY=VALUE)"
    raise ConfigError([f"--set {dotted}: {problem}; {forms}"])


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML with duplicate keys refused: PyYAML keeps the last silently, so a second ``training:`` block
    would replace the first. Booleans are YAML 1.2's, ``true`` and ``false`` alone: PyYAML follows YAML 1.1,
    which also reads ``on``, ``off``, ``yes``, ``no``, ``y`` and ``n`` as booleans, so ``compile: off`` would
    reach validation as ``False``. Those words stay strings; a yes/no option still takes them (pydantic reads
    "on", "off", "yes" and "no" as booleans), and an option whose values are words gets the word."""

    yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }


_UniqueKeyLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen and key != "<<":
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first at line {seen[key]})", key_node.start_mark
            )
        seen[key] = key_node.start_mark.line + 1
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def safe_load(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def parse_override(text: str) -> tuple[str, Any]:
    """``key.path=value`` with the value parsed as YAML (so numbers, booleans and lists keep their type)."""
    if "=" not in text:
        raise ConfigError([f"--set {text!r}: expected key=value, e.g. training.lr=1e-4"])
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError([f"--set {text!r}: empty key"])
    try:
        value = safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value {raw!r} is not valid YAML ({e})"]) from None
    return key, value


class _Lines:
    """Maps a key path to the line where it stands in the YAML source."""

    def __init__(self, text: str | None):
        self.root = None
        if text:
            try:
                self.root = yaml.compose(text)
            except yaml.YAMLError:
                self.root = None

    def line(self, loc: tuple) -> int | None:
        node, best = self.root, None
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    if k.value == str(part):
                        best, node = k.start_mark.line + 1, v
                        break
                else:
                    return best
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
                node = node.value[part]
                best = node.start_mark.line + 1
            else:
                return best
        return best


def _allowed_keys(loc: tuple) -> list[str] | None:
    """The allowed keys of the section that holds ``loc`` (for 'unknown key' messages)."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
            ann = model.model_fields[part].annotation
            model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        else:
            model = None
    if model is None and loc and loc[0] == "strategy":
        return None
    return list(model.model_fields) if model is not None else None


def format_errors(err: ValidationError, text: str | None, source: str | None, extra_allowed=None) -> list[str]:
    lines = _Lines(text)
    out = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        if loc and loc[0] in MODE_CONFIGS:  # the union's tag: the mode's own class
            loc = loc[1:]
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if not loc and (named := re.match(r"([a-z_]+(?:\.(?:[a-z_]+|\d+))+): ", msg)):  # a whole-config check
            key, msg = named[1], msg[named.end() :]
            loc = tuple(int(p) if p.isdigit() else p for p in key.split("."))  # strategy.1: the list's second
        if e["type"] == "extra_forbidden":
            allowed = e.get("ctx", {}).get("allowed") or _allowed_keys(loc)
            msg = "unknown key"
            if allowed:
                msg += f"; allowed: {', '.join(allowed)}"
                close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
                if close:
                    msg += f" (did you mean '{close[0]}'?)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif loc == ("mode",) and e["type"] == "literal_error":  # each mode's class allows its own name only
            msg = f"Input should be {', '.join(repr(m) for m in MODE_CONFIGS)} (got {e['input']!r})"
        elif "input" in e and not isinstance(e["input"], dict | list):
            msg += f" (got {e['input']!r})"
        out.append(f"{_where(source, lines.line(loc))}{key}: {msg}")
    return out


def _where(source: str | None, line: int | None) -> str:
    """``file:line: `` (or ``file: ``, or nothing) before a config problem."""
    return f"{source}:{line}: " if source and line else (f"{source}: " if source else "")


def load_config(source: str | os.PathLike | dict, overrides: list[str] | None = None) -> RunConfig:
    """Load and validate a run config from a YAML file or a dict, applying ``key=value`` overrides.

    Relative paths (data files, output_dir) are relative to the current directory, as with any CLI.
    Raises :class:`ConfigError` listing every problem.
    """
    text, name = None, None
    if isinstance(source, dict):
        raw = copy.deepcopy(source)  # overrides must not reach into the caller's dict
    else:
        path = Path(source)
        name = str(path)
        if not path.is_file():
            raise ConfigError([f"config file not found: {path.resolve()}"])
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError([f"{name}: not UTF-8 text (byte {e.start})"], name) from None
        try:
            raw = safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{name}:{mark.line + 1}" if mark else name
            raise ConfigError([f"{where}: not valid YAML: {getattr(e, 'problem', e)}"], name) from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError([f"{name}: the top level must be a mapping of keys (model, data, ...)"], name)
    for item in overrides or []:
        key, value = parse_override(item)
        _set_path(raw, key, value)
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_errors(e, text, name), name) from None
    cfg._source = name
    return cfg


def check_model_fit(cfg: RunConfig, model_dir: Path | None = None) -> None:
    """Refuse, as a config error at the option's line, strategy options that cannot fit the model in
    ``model_dir`` (more blocks asked for than it has, no recognisable blocks); built on the meta device
    from its config.json alone, so nothing is loaded. A no-op unless a component checks the model
    (tunelab.strategies.capabilities.Measured)."""
    from tunelab.strategies.stack import checks_model, model_problems

    if not checks_model(cfg.strategy):
        return
    if model_dir is None:
        from tunelab.models import resolve_model

        model_dir = resolve_model(cfg.model, allow_pickle=cfg.allow_pickle)
    problems = model_problems(cfg.strategy, model_dir)
    if problems:
        name = cfg._source
        text = Path(name).read_text(encoding="utf-8") if name and Path(name).is_file() else None
        lines = _Lines(text)
        raise ConfigError(
            [f"{_where(name, lines.line(loc))}{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems], name
        )
