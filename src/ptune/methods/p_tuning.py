"""P-Tuning v1 (Liu et al. 2021, "GPT Understands, Too", arXiv:2103.10385).

Pseudo tokens stand at any positions of a template, between real anchor words
(``"[P:3] {text} [P:2] capital [P:1] {mask}"``). Their embeddings are not trained directly: a prompt
encoder maps trainable inputs h_0..h_{N-1} to the vectors that fill the placeholders, which the
paper found to train faster and more stably. Encoders: ``lstm`` (a 2-layer bi-LSTM then a 2-layer
MLP, as the paper and HF PEFT), ``mlp`` (``encoder_num_layers`` linear layers with ReLU between) or
``none`` (the inputs are used as they are). Options: ``residual`` adds the encoder input to its
output, ``layer_norm`` normalises the output, ``hidden_layer_norm`` normalises each hidden layer of the
MLP (Linear -> LayerNorm -> ReLU -> Dropout -> Linear, the lab's encoder), ``encoder_dropout`` acts on
the encoder input, between LSTM layers and between MLP layers. The encoder is
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
from .base import IdentityHooks
from .prompt_tuning import LAYOUTS, InputPrompts, NoPrompt, _check_common, check_prompt_length, prompt_tables, without_prompts

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
    """used only when template is None; 0 = no virtual tokens at all (the frozen base and the head alone: an ablation / sweep baseline)"""
    encoder: str = "lstm"
    """lstm | mlp | none"""
    encoder_hidden_size: int | None = None
    """default: the model's hidden size (lstm: half of it per direction)"""
    encoder_num_layers: int = 2
    """lstm: bi-LSTM layers (its 2-layer MLP head stays); mlp: linear layers (1 = one linear map, no hidden layer)"""
    residual: bool = False
    """add the encoder's input to its output (before layer_norm)"""
    layer_norm: bool = False
    """LayerNorm on the encoder's output (after residual)"""
    hidden_layer_norm: bool = False
    """LayerNorm after each hidden linear layer of the MLP, before its ReLU (the lab's Linear -> LayerNorm -> ReLU -> Dropout -> Linear; lstm: in its MLP head); no effect without a hidden layer (encoder none, or mlp with encoder_num_layers 1)"""
    encoder_dropout: float = 0.0
    """dropout on the prompt encoder's input, between its LSTM layers and between its MLP layers (after each ReLU); training only"""
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
    prompt_layout: str = "ptune"
    """ptune: the template as written ([P:n] after the tokenizer's start tokens) | peft: every virtual token before them, where HF PEFT prepends them ([P:n] [CLS] text [SEP]); a template placing virtual tokens anywhere else is refused"""

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
            if self.prompt_layout in LAYOUTS:
                Template.parse(self.template).in_layout(self.prompt_layout)  # a placement PEFT's layout lacks: refused now
        else:
            check_prompt_length(self.num_virtual_tokens)
        _check_common(self)

    def template_for(self, task_template: Template) -> Template:
        if self.template is not None:
            return Template.parse(self.template).in_layout(self.prompt_layout)
        if self.num_virtual_tokens == 0:
            return without_prompts(task_template)
        if task_template.num_virtual_tokens:
            return task_template.in_layout(self.prompt_layout)
        return task_template.with_prefix_prompt(self.num_virtual_tokens, self.prompt_layout)


class PromptEncoder(nn.Module):
    """Maps (N, d) trainable inputs to (N, d) prompt vectors; one LSTM/MLP shared by all tasks.

    ``mlp_head`` keeps only Linear and ReLU modules (saved adapters name its weights by position); the
    hidden LayerNorms live in ``hidden_norms`` and dropout is applied in :meth:`_mlp`.
    """

    def __init__(self, config: PTuningConfig, d: int) -> None:
        super().__init__()
        self.config = config
        h = config.encoder_hidden_size
        self.dropout = nn.Dropout(config.encoder_dropout)
        hidden: list[int] = []  # widths of the MLP's hidden layers
        if config.encoder == "lstm":
            h = h or d // 2
            self.lstm_head = nn.LSTM(d, h, num_layers=config.encoder_num_layers, bidirectional=True,
                                     batch_first=True, dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0)
            self.mlp_head = nn.Sequential(nn.Linear(2 * h, 2 * h), nn.ReLU(), nn.Linear(2 * h, d))
            hidden = [2 * h]
        elif config.encoder == "mlp":
            h = h or d
            dims = [d] + [h] * (config.encoder_num_layers - 1) + [d]
            layers: list[nn.Module] = []
            for i in range(len(dims) - 1):
                layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
            self.mlp_head = nn.Sequential(*layers[:-1])
            hidden = dims[1:-1]
        if config.hidden_layer_norm and hidden:
            self.hidden_norms = nn.ModuleList(nn.LayerNorm(w) for w in hidden)
        self.norm = nn.LayerNorm(d) if config.layer_norm else None

    def _mlp(self, y: torch.Tensor) -> torch.Tensor:
        """Linear -> [LayerNorm] -> ReLU -> Dropout -> ... -> Linear."""
        norms = iter(getattr(self, "hidden_norms", ()))
        for layer in self.mlp_head:
            if isinstance(layer, nn.ReLU):  # between two linear layers
                norm = next(norms, None)
                y = self.dropout(layer(norm(y) if norm is not None else y))
            else:
                y = layer(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (num_tasks, N, d) -> same
        y = self.dropout(x)
        if self.config.encoder == "lstm":
            y = self._mlp(self.lstm_head(y)[0])
        elif self.config.encoder == "mlp":
            y = self._mlp(y)
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
                   label_words: Sequence[str] | None = None, **_: Any) -> IdentityHooks:
    if template.num_virtual_tokens == 0:
        return NoPrompt()
    return PTuningAdapter(config, template.num_virtual_tokens, base.get_input_embeddings(),
                          tokenizer=tokenizer, label_words=label_words)
