"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt Tuning").

k trainable soft-token embeddings fill the virtual-token placeholders of the template (by default
``[P:k]`` prepended to the task template, after the tokenizer's start tokens; ``prompt_layout="peft"``:
before them, ``[P:k]{start} ...``, where HF PEFT puts them). Initialisation: ``random`` (normal, scaled to the
embedding table's spread), ``vocab`` (rows sampled from the vocabulary), ``text`` (the embeddings of
``init_text``, repeated or truncated to k) or ``labels`` (the class label words, the paper's best).
Several prompts can live side by side (``num_tasks``): each row of a batch picks its own through
``task_ids``: one per task of a multi-task run, or the K members of a prompt ensemble. No reparameterization: that is P-Tuning.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .base import IdentityHooks

INITS = ("random", "vocab", "text", "labels")
LAYOUTS = ("ptune", "peft")  # prompt_layout: where the virtual tokens go relative to the tokenizer's start tokens


class NoPrompt(IdentityHooks):
    """A prompt method with ``num_virtual_tokens=0``: nothing is injected and nothing of its own trains."""


def scatter_prompts(embeds: torch.Tensor, virtual_index: torch.Tensor, prompts: torch.Tensor,
                    task_ids: torch.Tensor | None) -> torch.Tensor:
    """Overwrite placeholder rows of ``embeds`` with prompt vectors.

    embeds (B, T, d); virtual_index (B, T), -1 for real tokens; prompts (num_tasks, N, d);
    task_ids (B,) or None (task 0 for every row).
    """
    B, T, d = embeds.shape
    if task_ids is None:
        rows = prompts[:1].expand(B, -1, -1)  # (B, N, d)
    else:
        rows = prompts[task_ids]
    idx = virtual_index.clamp(min=0).unsqueeze(-1).expand(B, T, d)
    gathered = torch.gather(rows.to(embeds.dtype), 1, idx)  # (B, T, d)
    return torch.where((virtual_index >= 0).unsqueeze(-1), gathered, embeds)


def check_prompt_length(n: Any) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ConfigError(f"num_virtual_tokens={n!r} must be a whole number >= 0 (0: no virtual tokens)")


def without_prompts(task_template: Template) -> Template:
    """The template of a run with ``num_virtual_tokens=0``: the task's own, which must have no [P]."""
    if task_template.num_virtual_tokens:
        raise ConfigError(f"num_virtual_tokens=0 means no virtual tokens, but the template {task_template.source!r} "
                          f"has {task_template.num_virtual_tokens}; give a --template without [P] markers")
    return task_template


def _check_common(cfg: Any) -> None:
    if cfg.num_tasks < 1:
        raise ConfigError(f"num_tasks={cfg.num_tasks} must be >= 1")
    if cfg.init not in INITS:
        raise ConfigError(f"init={cfg.init!r} is not one of {INITS}")
    if cfg.init == "text" and not cfg.init_text:
        raise ConfigError("init='text' needs init_text, the words whose embeddings start the prompt")
    if cfg.prompt_layout not in LAYOUTS:
        raise ConfigError(f"prompt_layout={cfg.prompt_layout!r} is not one of {LAYOUTS}")


@dataclass(frozen=True)
class PromptTuningConfig:
    method: ClassVar[str] = "prompt_tuning"
    default_lr: ClassVar[float] = 3e-2  # learning rate when --lr is not given
    num_virtual_tokens: int = 20
    """soft tokens prepended to the task template; 0 = no virtual tokens at all (the frozen base and the head alone: an ablation / sweep baseline)"""
    init: str = "random"
    """random | vocab | text | labels"""
    init_text: str | None = None
    """for init="text" """
    num_tasks: int = 1
    """prompt tables side by side, selected per row by task_ids (set by the engine: tasks of a multi-task run, or --ensemble K)"""
    seed: int = 0
    """for random / vocab init (table k: seed + k)"""
    prompt_layout: str = "ptune"
    """ptune: the virtual tokens after the tokenizer's start tokens ([CLS] [P:n] text [SEP]) | peft: before them, where HF PEFT prepends them ([P:n] [CLS] text [SEP]), so `ptune export --format peft` can be exact (with --pooling pooler on BERT-family bases)"""

    def __post_init__(self) -> None:
        check_prompt_length(self.num_virtual_tokens)
        _check_common(self)

    def template_for(self, task_template: Template) -> Template:
        if self.num_virtual_tokens == 0:
            return without_prompts(task_template)
        if task_template.num_virtual_tokens == 0:
            return task_template.with_prefix_prompt(self.num_virtual_tokens, self.prompt_layout)
        if task_template.num_virtual_tokens != self.num_virtual_tokens:
            raise ConfigError(
                f"template {task_template.source!r} has {task_template.num_virtual_tokens} virtual tokens "
                f"but num_virtual_tokens={self.num_virtual_tokens}; make them agree")
        return task_template.in_layout(self.prompt_layout)


def initial_prompt(init: str, n: int, embedding: nn.Embedding, *, tokenizer: Any = None,
                   init_text: str | None = None, label_words: Sequence[str] | None = None,
                   seed: int = 0) -> torch.Tensor:
    """(n, d) starting vectors for a prompt, from the frozen input embedding table.

    Vectors are in the space the model sees: embedding modules that scale their output (Gemma's
    multiplies by sqrt(d), about 25 for Gemma 3 270M) scale these too, so a text-initialised prompt
    equals the hard prompt and a random one has the real tokens' magnitude.
    """
    weight = embedding.weight.detach()
    scale = float(getattr(embedding, "embed_scale", 1.0))

    def rows(ids: torch.Tensor) -> torch.Tensor:
        # only the chosen rows leave the table: a full fp32 copy of Gemma's 262k x 640 table is 670 MB
        return (weight[ids.to(weight.device)].float() * scale).cpu().clone()

    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        return torch.randn(n, weight.shape[1], generator=gen) * _std(weight) * scale
    if init == "vocab":
        # common-ish tokens: Lester et al. sample from the 5,000 most frequent; ids are a proxy
        hi = min(weight.shape[0], 5000)
        return rows(torch.randint(0, hi, (n,), generator=gen))
    if tokenizer is None:
        raise ConfigError(f"init={init!r} needs the tokenizer; pass tokenizer= to apply()")
    if init == "text":
        ids = tokenizer(init_text, add_special_tokens=False)["input_ids"]
    else:
        if not label_words:
            raise ConfigError("init='labels' needs label words (the task's labels or label_words)")
        ids = [i for w in label_words for i in tokenizer(" " + w, add_special_tokens=False)["input_ids"]]
    if not ids:
        raise ConfigError(f"init={init!r}: the text tokenizes to nothing; give some words")
    reps = -(-n // len(ids))  # ceil
    return rows(torch.tensor(ids).repeat(reps)[:n])


def prompt_tables(config: Any, n: int, embedding: nn.Embedding, **init_kwargs: Any) -> torch.Tensor:
    """(num_tasks, n, d) starting prompts: table k drawn with seed + k (random / vocab inits), so the
    members of a prompt ensemble start apart; text / label inits give every table the same words."""
    return torch.stack([initial_prompt(config.init, n, embedding, init_text=config.init_text, seed=config.seed + k,
                                       **init_kwargs) for k in range(config.num_tasks)])


def _std(weight: torch.Tensor, chunk: int = 16384) -> float:
    """Standard deviation of every entry, in float64 chunks (no full-precision copy of the table)."""
    total = sq = 0.0
    for start in range(0, weight.shape[0], chunk):
        part = weight[start:start + chunk].double()
        total += part.sum().item()
        sq += part.square().sum().item()
    count = weight.numel()
    mean = total / count
    return max(sq / count - mean * mean, 0.0) ** 0.5 * (count / max(count - 1, 1)) ** 0.5


class InputPrompts(IdentityHooks):
    """Shared hooks of the input-side prompt methods: ``prompts()`` fill the placeholders."""

    def prompts(self) -> torch.Tensor:  # (num_tasks, N, d)
        raise NotImplementedError

    def inject(self, embeds: torch.Tensor, virtual_index: torch.Tensor,
               task_ids: torch.Tensor | None) -> torch.Tensor:
        return scatter_prompts(embeds, virtual_index, self.prompts(), task_ids)


class PromptEmbedding(InputPrompts):
    """The soft prompt table: (num_tasks, num_virtual_tokens, d)."""
    task_tables = ("weight",)  # parameters whose first dimension is the prompt table (see ptune.transfer)

    def __init__(self, config: PromptTuningConfig, embedding: nn.Embedding, **init_kwargs: Any) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(prompt_tables(config, config.num_virtual_tokens, embedding, **init_kwargs))

    def prompts(self) -> torch.Tensor:
        return self.weight  # (num_tasks, N, d)

    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        cfg = {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": self.config.num_virtual_tokens,
               "prompt_tuning_init": "RANDOM"}
        return cfg, {"prompt_embeddings": self.prompts()[0].detach().clone()}


def apply_prompt_tuning(base: nn.Module, config: PromptTuningConfig, *, tokenizer: Any = None,
                        label_words: Sequence[str] | None = None, **_: Any) -> IdentityHooks:
    if config.num_virtual_tokens == 0:
        return NoPrompt()
    return PromptEmbedding(config, base.get_input_embeddings(), tokenizer=tokenizer, label_words=label_words)
