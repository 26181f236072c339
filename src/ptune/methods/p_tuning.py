"""P-Tuning v1 (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385).

Pseudo tokens stand at any positions of a template, between real anchor words
(``"[P:3] {text} [P:2] capital [P:1] {mask}"``). Their embeddings are not trained directly: a prompt
encoder maps trainable inputs h_0..h_{N-1} to the vectors that fill the placeholders, which the
paper found to train faster and more stably. Encoders: ``lstm`` (a 2-layer bi-LSTM then a 2-layer
MLP, as the paper and HF PEFT), ``mlp`` (``encoder_num_layers`` linear layers with ReLU between) or
``none`` (the inputs are used as they are). Options: ``residual`` adds the encoder input to its
output, ``layer_norm`` normalises the output, ``encoder_dropout`` acts on the encoder input (and between LSTM layers). The encoder is
part of the saved adapter, so training can resume. With several prompt tables (tasks of a multi-task
run, ensemble members) one encoder reads every table's inputs (``task_encoders="shared"``) or each
table has its own (``per_task``, the lab's MultiTaskPromptEncoder). Omitted: the paper's per-task anchor search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .prompt_tuning import InputPrompts, _check_common, prompt_tables

ENCODERS = ("lstm", "mlp", "none")
TASK_ENCODERS = ("shared", "per_task")


@dataclass(frozen=True)
class PTuningConfig:
    method: ClassVar[str] = "p_tuning"
    renamed: ClassVar[dict[str, str]] = {"dropout": "encoder_dropout"}  # older option names (format-1 adapters)
    default_lr: ClassVar[float] = 1e-2  # learning rate when --lr is not given
    template: str | None = None
    """with [P:n] markers; None: "[P:num_virtual_tokens]" before the task template"""
    num_virtual_tokens: int = 10
    """used only when template is None"""
    encoder: str = "lstm"
    """lstm | mlp | none"""
    encoder_hidden_size: int | None = None
    """default: the model's hidden size (lstm: half of it per direction)"""
    encoder_num_layers: int = 2
    """LSTM layers, or linear layers of the MLP"""
    residual: bool = False
    """add the encoder's input to its output"""
    layer_norm: bool = False
    """LayerNorm on the encoder's output"""
    encoder_dropout: float = 0.0
    """on the prompt encoder's input, and between its LSTM layers"""
    init: str = "random"
    """random | vocab | text | labels, for the encoder inputs"""
    init_text: str | None = None
    """the words whose embeddings start the prompt (init="text")"""
    num_tasks: int = 1
    """prompt tables side by side, selected per row by task_ids (set by the engine: tasks of a multi-task run, or --ensemble K)"""
    task_encoders: str = "shared"
    """with several prompt tables: shared (one encoder, per-task inputs) | per_task (an encoder per task)"""
    seed: int = 0
    """seed of the prompt's initialisation"""

    def __post_init__(self) -> None:
        if self.task_encoders not in TASK_ENCODERS:
            raise ConfigError(f"task_encoders={self.task_encoders!r} is not one of {TASK_ENCODERS}")
        if self.encoder not in ENCODERS:
            raise ConfigError(f"encoder={self.encoder!r} is not one of {ENCODERS}")
        if self.encoder_num_layers < 1:
            raise ConfigError(f"encoder_num_layers={self.encoder_num_layers} must be >= 1")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size < 1:
            raise ConfigError(f"encoder_hidden_size={self.encoder_hidden_size} must be >= 1")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout={self.encoder_dropout} must be in [0, 1)")
        if self.template is not None:
            if Template.parse(self.template).num_virtual_tokens == 0:
                raise ConfigError(f"P-Tuning template {self.template!r} has no virtual tokens; add [P] or [P:n]")
        elif self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens={self.num_virtual_tokens} must be a positive integer")
        _check_common(self)

    def template_for(self, task_template: Template) -> Template:
        if self.template is not None:
            return Template.parse(self.template)
        if task_template.num_virtual_tokens:
            return task_template
        return task_template.with_prefix_prompt(self.num_virtual_tokens)


class PromptEncoder(nn.Module):
    """Maps (N, d) trainable inputs to (N, d) prompt vectors; one LSTM/MLP shared by all tasks."""

    def __init__(self, config: PTuningConfig, d: int) -> None:
        super().__init__()
        self.config = config
        h = config.encoder_hidden_size
        self.dropout = nn.Dropout(config.encoder_dropout)
        if config.encoder == "lstm":
            h = h or d // 2
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, bidirectional=True,
                                     batch_first=True, dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
        elif config.encoder == "mlp":
            h = h or d
            dims = [d] + [h] * (config.encoder_num_layers - 1) + [d]
            layers: list[nn.Module] = []
            for i in range(len(dims) - 1):
                layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
            self.mlp_head = nn.Sequential(*layers[:-1])
        self.norm = nn.LayerNorm(d) if config.layer_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (num_tasks, N, d) -> same
        y = self.dropout(x)
        if self.config.encoder == "lstm":
            y = self.mlp_head(self.lstm_head(y)[0])
        elif self.config.encoder == "mlp":
            y = self.mlp_head(y)
        if self.config.residual:
            y = y + x
        return self.norm(y) if self.norm is not None else y


class PTuningAdapter(InputPrompts):
    task_tables = ("embedding",)  # per-table inputs; per-task encoders are the ModuleList "encoders"
    def __init__(self, config: PTuningConfig, num_virtual_tokens: int, embedding: nn.Embedding,
                 **init_kwargs: Any) -> None:
        super().__init__()
        self.config = config
        d = embedding.weight.shape[1]
        self.embedding = nn.Parameter(prompt_tables(config, num_virtual_tokens, embedding, **init_kwargs))  # (tasks, N, d)
        if config.task_encoders == "per_task" and config.num_tasks > 1:
            self.encoders = nn.ModuleList(PromptEncoder(config, d) for _ in range(config.num_tasks))
        else:
            self.encoder = PromptEncoder(config, d)

    def prompts(self) -> torch.Tensor:
        """(num_tasks, N, d): one encoder over every table's inputs, or table k through encoder k."""
        if hasattr(self, "encoders"):
            return torch.cat([enc(self.embedding[k:k + 1]) for k, enc in enumerate(self.encoders)])
        return self.encoder(self.embedding)

    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        # PEFT stores the encoder's output for inference (its "inference_mode" layout)
        cfg = {"peft_type": "P_TUNING", "num_virtual_tokens": self.embedding.shape[1],
               "encoder_reparameterization_type": self.config.encoder.upper(),
               "encoder_hidden_size": self.config.encoder_hidden_size or facts.hidden_size}
        with torch.no_grad():
            return cfg, {"prompt_embeddings": self.prompts()[0].detach().clone()}


def apply_p_tuning(base: nn.Module, config: PTuningConfig, *, template: Template, tokenizer: Any = None,
                   label_words: Sequence[str] | None = None, **_: Any) -> PTuningAdapter:
    return PTuningAdapter(config, template.num_virtual_tokens, base.get_input_embeddings(),
                          tokenizer=tokenizer, label_words=label_words)
