"""What a study runs: named variants of one set of training options, each over a list of seeds.

A study is ``compare`` (one variant per method), ``sweep`` (one per value of one option) or
``ablate`` (P-Tuning with one part removed per variant). Every (variant, seed) is an ordinary run
in ``OUTPUT/runs/<variant>/seed-<seed>``; the plan is written to ``OUTPUT/study.json`` so a study
started again continues where it stopped, and refuses a plan that changed under it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..engine.config import TrainConfig
from ..errors import ConfigError
from ..methods import method_entry
from ..options import setting_value, train_fields

PLAN_NAME = "study.json"
KINDS = ("compare", "sweep", "ablate", "probe")

# The lab's ablation of P-Tuning (section 6.2): the full model and one part removed per row. The full
# model is the lab's encoder: a two-layer MLP (Linear -> LayerNorm -> ReLU -> Linear) with a residual
# connection (options given to ablate apply to it).
ABLATION_FULL = {"encoder": "mlp", "encoder_num_layers": 2, "residual": True, "hidden_layer_norm": True}
ABLATIONS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("the full model (MLP prompt encoder: 2 layers, LayerNorm between them, residual)", {}),
    "no_encoder": ("prompt encoder removed (virtual tokens trained directly)", {"encoder": "none"}),
    "no_virtual_tokens": ("virtual tokens removed (the frozen base and the head alone)", {"num_virtual_tokens": 0}),
    "no_mlp_middle": ("the MLP's middle layer removed (one linear layer)", {"encoder_num_layers": 1}),
    "no_residual": ("the residual connection removed", {"residual": False}),
}


@dataclass(frozen=True)
class Variant:
    """One row of a study: a name, the training options it changes and the method options it sets."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields (method, lr, ...)
    method_options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


@dataclass(frozen=True)
class Study:
    kind: str
    base: dict[str, Any]  # the TrainConfig options every run shares (no output_dir)
    variants: tuple[Variant, ...]
    seeds: tuple[int, ...]
    swept: str | None = None  # sweep: the option varied

    def run_dir(self, output_dir: Path, variant: Variant, seed: int) -> Path:
        return output_dir / "runs" / slug(variant.name) / f"seed-{seed}"

    def run_options(self, output_dir: Path, variant: Variant, seed: int) -> dict[str, Any]:
        """The full TrainConfig values of one run."""
        options = {**self.base, **variant.options, "seed": seed, "progress": False,
                   "output_dir": str(self.run_dir(output_dir, variant, seed))}
        options["method_options"] = {**self.base.get("method_options", {}), **variant.method_options}
        return options

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "base": self.base, "seeds": list(self.seeds), "swept": self.swept,
                "variants": [dataclasses.asdict(v) for v in self.variants]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Study":
        return cls(values["kind"], values["base"], tuple(Variant(**v) for v in values["variants"]),
                   tuple(values["seeds"]), values.get("swept"))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def parse_seeds(value: Any, first: int) -> tuple[int, ...]:
    """``3`` -> three seeds from ``first``; ``13,21,42`` or a list -> those seeds."""
    if isinstance(value, bool):
        raise ConfigError(f"seeds={value!r} must be a count (3) or a list of seeds (13,21,42)")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"seeds={value} must be at least 1")
        return tuple(first + k for k in range(value))
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        seeds = tuple(int(str(s).strip()) for s in items)
    except ValueError:
        raise ConfigError(f"seeds={value!r} must be a count (3) or a comma-separated list of seeds (13,21,42)") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds={value!r}: give each seed once")
    return seeds


def split_list(value: Any, what: str) -> list[Any]:
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value or [])
    items = [s for s in items if s != ""]
    if not items:
        raise ConfigError(f"{what} is empty; give a comma-separated list")
    return items


def _method_fields(method: str) -> set[str]:
    return {f.name for f in dataclasses.fields(method_entry(method)[0])}


def _check_options(base: dict[str, Any]) -> None:
    if base.get("resume") or base.get("overwrite"):
        raise ConfigError("a study resumes its runs by itself: run the same command again (no --resume / --overwrite)")
    if "output_dir" in base:
        raise ConfigError("internal: the study's output_dir is not a training option")


def compare_plan(methods: Any, seeds: tuple[int, ...], base: dict[str, Any]) -> Study:
    """One variant per method; method options given to the study go to the methods that have them.

    A method may carry its own settings after colons, ``lora:lr=5e-3:r=16`` (training options such as
    ``lr`` or the method's own options), so each method can run at its own tuned learning rate."""
    _check_options(base)
    items = split_list(methods, "--methods")
    if len(set(items)) != len(items):
        raise ConfigError(f"--methods lists {items}: each method once")
    shared = dict(base.get("method_options", {}))
    base = {k: v for k, v in base.items() if k not in ("method", "method_options")}
    variants, names = [], []
    for item in items:
        name, *settings = [part.strip() for part in item.split(":")]
        method_entry(name)  # an unknown method fails now, naming the known ones
        if name == "manual":
            raise ConfigError("manual trains nothing; compare trained methods (zero-shot: ptune eval --zero-shot)")
        fields = _method_fields(name)
        options: dict[str, Any] = {"method": name}
        own = {k: v for k, v in shared.items() if k in fields}
        for setting in settings:
            key, eq, value = setting.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or not key:
                raise ConfigError(f"--methods {item!r}: write settings as METHOD:option=value (e.g. lora:lr=5e-3)")
            if key in ("method", "seed", "output_dir", "task", "resume", "overwrite"):
                raise ConfigError(f"--methods {item!r}: {key} is set by the study, not per method")
            if key in train_fields():
                options[key] = setting_value(key, value, name, f"--methods {item!r}")
            elif key in fields:
                own[key] = setting_value(key, value, name, f"--methods {item!r}")
            else:
                raise ConfigError(f"--methods {item!r}: {key} is neither a training option nor an option of {name}")
        names.append(name)
        variants.append(Variant(item if settings else name, options, own))
    unused = set(shared) - set().union(*(_method_fields(n) for n in names))
    if unused:
        raise ConfigError(f"{', '.join(sorted(unused))}: no method in --methods has this option")
    return Study("compare", base, tuple(variants), seeds)


def sweep_plan(sweep: str, seeds: tuple[int, ...], base: dict[str, Any]) -> Study:
    """``option=v1,v2,...``: one variant per value of a training option or of the method's option."""
    _check_options(base)
    if not isinstance(sweep, str) or "=" not in sweep:
        raise ConfigError(f"--sweep {sweep!r} must look like option=v1,v2 (e.g. num_virtual_tokens=0,5,20)")
    option, _, values = sweep.partition("=")
    option = option.strip().lstrip("-").replace("-", "_")
    method = base.get("method", TrainConfig.method)
    if option in ("seed", "output_dir", "resume", "overwrite", "task"):
        raise ConfigError(f"--sweep {option}: sweep a training or method option (seeds: --seeds)")
    if option not in train_fields() and option not in _method_fields(method):
        raise ConfigError(f"--sweep {option}: neither a training option nor an option of method {method} "
                          f"(see ptune train --help)")
    values = [setting_value(option, v, method, f"--sweep {option}") for v in split_list(values, f"--sweep {option}")]
    if option in train_fields():
        variants = [Variant(f"{option}={v}", {option: v}) for v in values]
    else:
        variants = [Variant(f"{option}={v}", {}, {option: v}) for v in values]
    if len({v.name for v in variants}) != len(variants):
        raise ConfigError(f"--sweep {sweep}: each value once")
    return Study("sweep", base, tuple(variants), seeds, swept=option)


def ablate_plan(seeds: tuple[int, ...], base: dict[str, Any], variants: Any = None) -> Study:
    """P-Tuning's ablation: the full model, then each part removed (``ABLATIONS``)."""
    _check_options(base)
    if base.get("method", "p_tuning") != "p_tuning":
        raise ConfigError(f"ablate studies P-Tuning's parts; method {base['method']} has no prompt encoder "
                          "(use ptune compare or ptune sweep)")
    names = split_list(variants, "--variants") if variants else list(ABLATIONS)
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        raise ConfigError(f"unknown ablation {unknown[0]!r}; choose from {', '.join(ABLATIONS)}")
    if "full" not in names:
        names = ["full", *names]  # the drops are measured from it
    base = {**base, "method": "p_tuning"}
    full = {**ABLATION_FULL, **base.get("method_options", {})}
    if full.get("template"):
        raise ConfigError("ablate removes the virtual tokens itself: give --num-virtual-tokens, not a P-Tuning template")
    base["method_options"] = full
    return Study("ablate", base, tuple(Variant(n, {}, ABLATIONS[n][1], ABLATIONS[n][0]) for n in names), seeds)


def write_or_check_plan(study: Study, output_dir: Path) -> Study:
    """Write the plan; a study folder started before must hold the same plan (then it continues)."""
    path = output_dir / PLAN_NAME
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} is unreadable ({e}); remove it or use another --output-dir") from None
        new = json.loads(json.dumps(study.to_dict()))
        if old != new:
            changed = sorted(k for k in new if old.get(k) != new[k]) or ["the plan"]
            raise ConfigError(f"{output_dir} holds a {old.get('kind', 'different')} study with other settings "
                              f"({', '.join(changed)} differ); use another --output-dir to start a new one, or "
                              f"repeat the original command to continue it")
        return study
    output_dir.mkdir(parents=True, exist_ok=True)
    if any(output_dir.iterdir()):
        raise ConfigError(f"{output_dir} is not empty and holds no study; choose another --output-dir")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(study.to_dict(), indent=2))
    tmp.replace(path)
    return study


def read_plan(output_dir: Path) -> Study:
    path = Path(output_dir) / PLAN_NAME
    if not path.is_file():
        raise ConfigError(f"{output_dir} holds no study ({PLAN_NAME} missing); run ptune compare / sweep / ablate "
                          f"with --output-dir {output_dir}")
    return Study.from_dict(json.loads(path.read_text()))
