"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512).

Each targeted layer adds an SVD-shaped update W + P diag(lambda) Q, with P (out x r), Q (r x in)
and lambda (r) trainable, scaled by alpha / ranknum as in HF PEFT. During training the triplets
(P column, lambda entry, Q row) are ranked by a sensitivity importance |w * grad| smoothed with an
exponential moving average (beta1) and multiplied by its uncertainty (beta2). A cubic schedule
lowers the total rank budget from init_r per layer to target_r per layer between ``tinit`` and
``total_step - tfinal``; every ``deltaT`` steps the least important lambdas are set to exactly
zero. An orthogonality penalty ||P^T P - I||^2 + ||Q Q^T - I||^2 joins the loss. The training loop
does all of it through the adapter's hooks (``extra_loss``, ``after_optimizer_step``,
``set_total_steps``); users call nothing. Pruned ranks are the zeros of lambda, so they are saved
with the weights and come back on load (``ranks()`` reports them). Omitted: PEFT's rank-pattern
resizing of the matrices after training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .lora import LoraAdapter, find_targets, layer_dims, no_virtual_tokens, wrap_layers


@dataclass(frozen=True)
class AdaLoraConfig:
    method: ClassVar[str] = "adalora"
    default_lr: ClassVar[float] = 1e-3  # learning rate when --lr is not given
    init_r: int = 12  # starting rank per layer
    target_r: int = 8  # average rank per layer at the end
    alpha: float = 32.0  # PEFT's lora_alpha; the update is scaled by alpha / ranknum
    dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    tinit: int = 0  # steps of warm-up before any pruning
    tfinal: int = 0  # final steps at the target budget
    deltaT: int = 1  # steps between budget reallocations
    beta1: float = 0.85  # EMA of sensitivity
    beta2: float = 0.85  # EMA of uncertainty
    orth_reg_weight: float = 0.5
    total_step: int | None = None  # None: the training loop tells the adapter

    def __post_init__(self) -> None:
        if not (isinstance(self.init_r, int) and isinstance(self.target_r, int) and 1 <= self.target_r <= self.init_r):
            raise ConfigError(f"need 1 <= target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.deltaT < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ConfigError("deltaT must be >= 1 and tinit, tfinal >= 0")
        if self.target_modules is not None:
            object.__setattr__(self, "target_modules", tuple([self.target_modules] if isinstance(
                self.target_modules, str) else self.target_modules))

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


class SVDLinear(nn.Module):
    """W x + (P diag(lambda) Q) dropout(x) * alpha / ranknum; lambda entries at 0 are pruned ranks."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_f, out_f = layer_dims(base_layer)
        self.lora_A = nn.Parameter(torch.randn(r, in_f) * 0.02)  # Q
        self.lora_E = nn.Parameter(torch.zeros(r, 1))  # lambda
        self.lora_B = nn.Parameter(torch.randn(out_f, r) * 0.02)  # P
        self.register_buffer("ranknum", torch.tensor(float(r)), persistent=False)
        self.scaling = alpha
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        h = self.dropout(x).to(self.lora_A.dtype)
        update = (h @ (self.lora_A * self.lora_E).T) @ self.lora_B.T
        return y + (update * self.scaling / (self.ranknum + 1e-5)).to(y.dtype)

    def orth_penalty(self) -> torch.Tensor:
        eye = torch.eye(self.lora_A.shape[0], device=self.lora_A.device)
        return ((self.lora_A @ self.lora_A.T - eye) ** 2).sum() + ((self.lora_B.T @ self.lora_B - eye) ** 2).sum()


class AdaLoraAdapter(LoraAdapter):
    def __init__(self, config: AdaLoraConfig, base: nn.Module, names: list[str]) -> None:
        super().__init__(config, base, names)
        self.total_step = config.total_step
        self._ema: dict[int, torch.Tensor] = {}
        self._unc: dict[int, torch.Tensor] = {}
        self.budget_history: list[tuple[int, int]] = []  # (step, budget) whenever ranks were masked

    def set_total_steps(self, total: int) -> None:
        if self.config.total_step is None:
            self.total_step = total
        if self.total_step <= self.config.tinit + self.config.tfinal:
            raise ConfigError(f"adalora: total_step={self.total_step} must exceed tinit + tfinal "
                              f"({self.config.tinit} + {self.config.tfinal}); train longer or lower them")

    def budget(self, step: int) -> int:
        """Total rank allowed after ``step`` steps: init, cubic decay, then target."""
        cfg, n = self.config, len(self.names)
        init, target = cfg.init_r * n, cfg.target_r * n
        if step < cfg.tinit:
            return init
        end = self.total_step - cfg.tfinal
        if step >= end:
            return target
        progress = (step - cfg.tinit) / max(1, end - cfg.tinit)
        return int(target + (init - target) * (1 - progress) ** 3)

    def extra_loss(self) -> torch.Tensor:
        layers = list(self.layers().values())
        return self.config.orth_reg_weight * sum(lay.orth_penalty() for lay in layers) / len(layers)

    @torch.no_grad()
    def _update_importance(self) -> list[torch.Tensor]:
        scores = []
        for layer in self.layers().values():
            parts = []
            for p in (layer.lora_A, layer.lora_E, layer.lora_B):
                if p.grad is None:
                    parts.append(None)
                    continue
                ipt = (p * p.grad).abs()
                key = id(p)
                ema = self._ema.get(key, torch.zeros_like(ipt))
                unc = self._unc.get(key, torch.zeros_like(ipt))
                ema = self.config.beta1 * ema + (1 - self.config.beta1) * ipt
                unc = self.config.beta2 * unc + (1 - self.config.beta2) * (ipt - ema).abs()
                self._ema[key], self._unc[key] = ema, unc
                parts.append(ema * unc)
            a, e, b = parts
            if a is None or e is None or b is None:
                return []
            scores.append(e.view(-1) + a.mean(dim=1) + b.mean(dim=0))  # (r,) per triplet
        return scores

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Called by the loop after each optimizer step (gradients still present), as PEFT's update_and_allocate."""
        if self.total_step is None:
            raise ConfigError("adalora needs total_step (the training loop sets it; set it yourself outside ptune's loop)")
        scores = self._update_importance()
        end = self.total_step - self.config.tfinal
        due = step >= self.config.tinit and ((step - self.config.tinit) % self.config.deltaT == 0 or step >= end)
        if not scores or not due:
            return
        budget = self.budget(step)
        flat = torch.cat(scores)
        if budget < flat.numel():
            threshold = torch.kthvalue(flat, flat.numel() - budget).values
            for layer, s in zip(self.layers().values(), scores):
                layer.lora_E.masked_fill_((s <= threshold).view(-1, 1), 0.0)
        self.budget_history.append((step, budget))

    def ranks(self) -> dict[str, int]:
        """Ranks in use per layer: the nonzero lambdas."""
        return {n: int((lay.lora_E != 0).sum()) for n, lay in self.layers().items()}

    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        raise ConfigError("adalora export to the PEFT layout is not supported yet; use ptune's own adapter files")


def apply_adalora(base: nn.Module, config: AdaLoraConfig, **_: Any) -> AdaLoraAdapter:
    names = find_targets(base, config.target_modules, config.method)
    for name in names:
        in_f, out_f = layer_dims(base.get_submodule(name))
        if config.init_r > min(in_f, out_f):
            raise ConfigError(f"init_r={config.init_r} exceeds the width of {name} ({in_f} -> {out_f})")
    wrap_layers(base, names, lambda _, layer: SVDLinear(layer, config.init_r, config.alpha, config.dropout))
    return AdaLoraAdapter(config, base, names)
