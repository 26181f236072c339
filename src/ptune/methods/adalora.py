"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
arXiv:2303.10512), following HF PEFT's implementation step for step.

Each targeted layer adds an SVD-shaped update P diag(lambda) Q x * alpha / ranknum, with Q (r x in,
``lora_A``), lambda (r, ``lora_E``, zero at init) and P (out x r, ``lora_B``) trainable and
ranknum fixed at init_r. The triplets (Q row, lambda entry, P column) are ranked by sensitivity
|w * grad|, smoothed by an exponential moving average (beta1) and multiplied by its uncertainty
(beta2). The total rank budget stays at init_r per layer for ``tinit`` steps, falls along a cubic
to target_r per layer at step ``total_step - tfinal``, and every ``deltaT`` steps the least
important lambdas are set to exactly zero; at the end of the budgeting phase the rank pattern is
fixed and re-applied after every later step (with ``tfinal=0`` that step never comes, and the last
masking, one step short of it, may leave a rank or two over the target, as in PEFT). An
orthogonality penalty, the mean over matrices of ||Q Q^T - I||_F and ||P^T P - I||_F (PEFT's form;
the paper squares the norms), joins the loss.

The training loop drives it through three optional adapter hooks, so users call nothing:
``set_total_steps(n)`` before training (unless the config fixes ``total_step``), ``extra_loss()``
added to each loss, and ``after_optimizer_step(step)`` after ``optimizer.step()`` and before
``zero_grad()`` (PEFT's ``update_and_allocate`` order: the importance uses this step's gradients and
the freshly updated weights; masking after the step keeps pruned lambdas at zero in what is saved).

Saving: a pruned rank is a lambda that is exactly zero, so the rank pattern travels inside the
saved ``lora_E`` tensors and ``after_load()`` (called by ptune after loading) re-derives it; an
all-zero lambda everywhere means an untrained adapter at full rank. Omitted: the importance
averages are not checkpointed (a resumed run restarts them, as PEFT's), and the matrices are not
shrunk to the final ranks (PEFT does so only when exporting; so does :meth:`peft_export`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import ConfigError
from ..templates import Template
from .lora import (LowRankLayer, WeightAdapter, check_rank, no_virtual_tokens, normalize_targets, peft_targets,
                   peft_task_type, resolve_targets, wrap_layers)


def check_schedule(total_step: int, tinit: int, tfinal: int) -> None:
    if total_step - tfinal <= tinit:
        raise ConfigError(f"adalora: total_step={total_step} leaves no budgeting phase after tinit={tinit} and "
                          f"before the final tfinal={tfinal} steps; need total_step > tinit + tfinal "
                          "(train longer, or lower tinit / tfinal)")


@dataclass(frozen=True)
class AdaLoraConfig:
    method: ClassVar[str] = "adalora"
    renamed: ClassVar[dict[str, str]] = {"dropout": "lora_dropout"}  # older option names (format-1 adapters)
    default_lr: ClassVar[float] = 1e-3  # learning rate when --lr is not given
    init_r: int = 12
    """starting rank per layer"""
    target_r: int = 8
    """average rank per layer at the end"""
    alpha: float = 32.0
    """PEFT's lora_alpha; the update is scaled by alpha / init_r"""
    lora_dropout: float = 0.0
    """dropout on the update's input (PEFT's lora_dropout)"""
    target_modules: tuple[str, ...] | None = None
    """as LoRA's: suffixes, "re:<regex>", "all-linear" """
    tinit: int = 0
    """warm-up steps at the full budget"""
    tfinal: int = 0
    """final steps with the rank pattern fixed"""
    deltaT: int = 1
    """steps between budget reallocations"""
    beta1: float = 0.85
    """EMA factor of the sensitivity"""
    beta2: float = 0.85
    """EMA factor of its uncertainty"""
    orth_reg_weight: float = 0.5
    """weight of the orthogonality penalty"""
    total_step: int | None = None
    """None: the training loop tells the adapter (set_total_steps)"""

    def __post_init__(self) -> None:
        ints = (self.init_r, self.target_r, self.tinit, self.tfinal, self.deltaT)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise ConfigError("init_r, target_r, tinit, tfinal and deltaT must be integers")
        if not 1 <= self.target_r <= self.init_r:
            raise ConfigError(f"need 1 <= target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        for name in ("beta1", "beta2"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be in (0, 1)")
        if self.deltaT < 1 or self.tinit < 0 or self.tfinal < 0:
            raise ConfigError(f"need deltaT >= 1 and tinit, tfinal >= 0, got deltaT={self.deltaT}, "
                              f"tinit={self.tinit}, tfinal={self.tfinal}")
        if not self.alpha > 0 or self.orth_reg_weight < 0 or not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"need alpha > 0, orth_reg_weight >= 0 and lora_dropout in [0, 1), got alpha={self.alpha}, "
                              f"orth_reg_weight={self.orth_reg_weight}, lora_dropout={self.lora_dropout}")
        if self.total_step is not None:
            check_schedule(self.total_step, self.tinit, self.tfinal)
        object.__setattr__(self, "target_modules", normalize_targets(self.target_modules))

    def template_for(self, task_template: Template) -> Template:
        return no_virtual_tokens(self.method, task_template)


class SVDLinear(LowRankLayer):
    """W x + P diag(lambda) Q dropout(x) * alpha / ranknum; Q, P ~ N(0, 0.02^2), lambda = 0 at init."""

    def __init__(self, name: str, base_layer: nn.Module, r: int, alpha: float, dropout: float) -> None:
        super().__init__(name, base_layer, dropout)
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.randn(r, self.in_features, device=device) * 0.02)  # Q (r, in)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=device))  # lambda (r, 1)
        self.lora_B = nn.Parameter(torch.randn(self.out_features, r, device=device) * 0.02)  # P (out, r)
        self.scaling = alpha / (float(r) + 1e-5)  # ranknum stays init_r after pruning, as PEFT's

    def delta_weight(self) -> torch.Tensor:
        return self.lora_B @ (self.lora_A * self.lora_E) * self.scaling

    def update(self, h: torch.Tensor) -> torch.Tensor:
        return (h @ (self.lora_A * self.lora_E).T) @ self.lora_B.T * self.scaling

    def orth_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """||Q Q^T - I||_F and ||P^T P - I||_F."""
        qq, pp = self.lora_A @ self.lora_A.T, self.lora_B.T @ self.lora_B  # (r, r) each
        eye = torch.eye(qq.shape[0], device=qq.device, dtype=qq.dtype)
        return torch.linalg.matrix_norm(qq - eye), torch.linalg.matrix_norm(pp - eye)


class AdaLoraAdapter(WeightAdapter):
    def __init__(self, config: AdaLoraConfig, base: nn.Module, names: list[str], note: str | None = None) -> None:
        super().__init__(config, base, names, note)
        self.total_step = config.total_step
        self.init_budget = config.init_r * len(names)
        self.target_budget = config.target_r * len(names)
        self._ema: dict[tuple[str, str], torch.Tensor] = {}  # smoothed sensitivity per (layer, A/E/B)
        self._unc: dict[tuple[str, str], torch.Tensor] = {}  # smoothed uncertainty
        self._pattern: dict[str, torch.Tensor] | None = None  # layer -> (init_r,) bool, True = rank kept
        self.budget_history: list[tuple[int, int]] = []  # (step, budget) at every masking

    # ------------------------------------------------------------------ hooks the training loop calls

    def set_total_steps(self, total: int) -> None:
        """The length of the run, from the loop; a ``total_step`` in the config wins."""
        if self.config.total_step is None:
            check_schedule(total, self.config.tinit, self.config.tfinal)
            self.total_step = total

    def extra_loss(self) -> torch.Tensor:
        """orth_reg_weight * mean over the Q and P matrices of ||Q Q^T - I||_F, ||P^T P - I||_F."""
        norms = [n for layer in self.layers().values() for n in layer.orth_norms()]
        return self.config.orth_reg_weight * torch.stack(norms).mean()

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        """Update importance and mask ranks; call after ``optimizer.step()``, before ``zero_grad()``."""
        if self.total_step is None:
            raise ConfigError("adalora needs total_step: ptune's training loop sets it; outside it, call "
                              "adapter.set_total_steps(n) or put total_step in the AdaLoraConfig")
        end = self.total_step - self.config.tfinal
        if step < end:  # budgeting phase
            self._update_importance()
            budget, due = self.budget(step)
            if due:
                self._mask_to_budget(step, budget)
        elif step == end:  # the budget reaches the target: fix the pattern
            self._mask_to_budget(step, self.target_budget)
            self._ema, self._unc = {}, {}
        elif self._pattern is not None:  # final phase: keep pruned ranks at zero
            for name, layer in self.layers().items():
                layer.lora_E.masked_fill_(~self._pattern[name].view(-1, 1), 0.0)

    def after_load(self) -> None:
        """Re-derive the rank pattern from the loaded lambdas (zeros are pruned ranks)."""
        lambdas = {n: layer.lora_E.detach().view(-1) for n, layer in self.layers().items()}
        if all(not bool(e.any()) for e in lambdas.values()):
            self._pattern = None  # untrained: every rank still in play
        else:
            self._pattern = {n: e != 0 for n, e in lambdas.items()}

    # ------------------------------------------------------------------ the schedule and the allocator

    def budget(self, step: int) -> tuple[int, bool]:
        """(total rank allowed at ``step``, whether ranks are masked at it): PEFT's budget_schedule."""
        cfg = self.config
        if self.total_step is None:
            raise ConfigError("adalora: the budget needs total_step (set_total_steps or the config)")
        if step <= cfg.tinit:
            return self.init_budget, False
        if step > self.total_step - cfg.tfinal:
            return self.target_budget, True
        left = 1 - (step - cfg.tinit) / (self.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_budget - self.target_budget) * left ** 3 + self.target_budget)
        return budget, step % cfg.deltaT == 0

    def _update_importance(self) -> None:
        b1, b2 = self.config.beta1, self.config.beta2
        for name, layer in self.layers().items():
            for part in ("A", "E", "B"):
                p = getattr(layer, f"lora_{part}")
                if p.grad is None:
                    raise RuntimeError(f"adalora: {name}.lora_{part} has no gradient; call after_optimizer_step "
                                       "after optimizer.step() and before optimizer.zero_grad()")
                ipt = (p * p.grad).abs()
                key = (name, part)
                ema = b1 * self._ema.get(key, torch.zeros_like(ipt)) + (1 - b1) * ipt
                unc = b2 * self._unc.get(key, torch.zeros_like(ipt)) + (1 - b2) * (ipt - ema).abs()
                self._ema[key], self._unc[key] = ema, unc

    def _scores(self) -> dict[str, torch.Tensor]:
        """Importance of each triplet, (init_r,) per layer: lambda's + the mean of its Q row and P column."""
        def score(name: str, part: str, like: torch.Tensor) -> torch.Tensor:
            key = (name, part)
            return self._ema[key] * self._unc[key] if key in self._ema else torch.zeros_like(like)

        out = {}
        for name, layer in self.layers().items():
            e = score(name, "E", layer.lora_E).view(-1)
            a = score(name, "A", layer.lora_A).mean(dim=1)
            b = score(name, "B", layer.lora_B).mean(dim=0)
            out[name] = e + a + b
        return out

    def _mask_to_budget(self, step: int, budget: int) -> None:
        scores = self._scores()
        k = self.init_budget - budget
        if k <= 0:  # nothing to prune yet
            self._pattern = {n: torch.ones_like(s, dtype=torch.bool) for n, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
            self._pattern = {n: s > threshold for n, s in scores.items()}
        for name, layer in self.layers().items():
            layer.lora_E.masked_fill_(~self._pattern[name].view(-1, 1), 0.0)
        self.budget_history.append((step, budget))

    # ------------------------------------------------------------------ what users read

    def ranks(self) -> dict[str, int]:
        """The rank each layer keeps (init_r everywhere before the first masking)."""
        if self._pattern is None:
            return {n: self.config.init_r for n in self.names}
        return {n: int(self._pattern[n].sum()) for n in self.names}

    def rank_pattern(self) -> dict[str, list[bool]] | None:
        return None if self._pattern is None else {n: self._pattern[n].tolist() for n in self.names}

    def peft_export(self, facts: Any) -> tuple[dict, dict[str, torch.Tensor]]:
        """PEFT's AdaLoRA layout: matrices cut to the kept ranks, the pattern in ``rank_pattern``."""
        cfg = self.config
        total = self.total_step or cfg.tinit + cfg.tfinal + 1  # PEFT insists on a valid schedule
        pattern = self.rank_pattern()
        out = {"peft_type": "ADALORA", "init_r": cfg.init_r, "target_r": cfg.target_r,
               "lora_alpha": cfg.alpha, "lora_dropout": cfg.lora_dropout, "bias": "none",
               "target_modules": peft_targets(self._base[0], self.names),
               "fan_in_fan_out": any(layer.transposed for layer in self.layers().values()),
               "tinit": cfg.tinit, "tfinal": cfg.tfinal, "deltaT": cfg.deltaT, "beta1": cfg.beta1,
               "beta2": cfg.beta2, "orth_reg_weight": cfg.orth_reg_weight, "total_step": total,
               "rank_pattern": None if pattern is None else {f"{n}.lora_E": p for n, p in pattern.items()},
               **peft_task_type(self._base[0])}
        tensors = {}
        for name, layer in self.layers().items():
            keep = self._pattern[name] if self._pattern is not None else torch.ones(cfg.init_r, dtype=torch.bool)
            tensors[f"base_model.model.{name}.lora_A"] = layer.lora_A.detach()[keep].clone()
            tensors[f"base_model.model.{name}.lora_E"] = layer.lora_E.detach()[keep].clone()
            tensors[f"base_model.model.{name}.lora_B"] = layer.lora_B.detach()[:, keep].clone()
        return out, tensors


def apply_adalora(base: nn.Module, config: AdaLoraConfig, **_: Any) -> AdaLoraAdapter:
    names, note = resolve_targets(base, config.target_modules, config.method)
    check_rank(base, names, config.init_r, "init_r")
    wrap_layers(base, names, lambda name, layer: SVDLinear(name, layer, config.init_r, config.alpha,
                                                           config.lora_dropout))
    return AdaLoraAdapter(config, base, names, note)
