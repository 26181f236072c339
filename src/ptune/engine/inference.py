"""Using a finished run: evaluate it, predict labels for new text, generate with it.

The model is rebuilt from the resolved spec saved with the adapter (base and how it was loaded,
head, template, method, task); the run's ``config.json`` is read only for where its data came from
(built-in task or files, split seed) when a split is evaluated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..api import CONFIG_NAME, load_adapter, read_spec
from ..batching import collate
from ..data import Task, load_records
from ..errors import ConfigError, PtuneError
from ..heads import HEAD_KINDS, head_kind
from ..model import PtuneModel
from ..models import load_tokenizer
from .build import build_model, encode_records, load_task, make_encoder, model_is_encoder
from .config import TrainConfig
from .evaluate import decode_predictions, predict_logits, score
from .loop import bf16_autocast, run_precision
from .run_dir import read_run_config


def _find_adapter(path: Path) -> tuple[Path, Path | None]:
    """(adapter folder, run directory or None) for a run directory, its best/ or a bare adapter."""
    if (path / "best" / CONFIG_NAME).is_file():
        return path / "best", path if (path / "config.json").is_file() else None
    if (path / CONFIG_NAME).is_file():
        return path, path.parent if (path.parent / "config.json").is_file() else None
    raise PtuneError(f"{path} is not a finished ptune run (no config.json with best/{CONFIG_NAME}) nor an adapter "
                     "folder; pass the --output-dir of a completed `ptune train`")


class Run:
    """A trained run directory (or an adapter folder) ready for inference.

    ``trust_remote_code`` / ``allow_pickle``: the consent a base loaded that way for training needs
    again. ``Run.zero_shot(cfg)`` gives the same interface for the task's hand-written prompt with
    nothing trained (method ``manual``, verbalizer head): the zero-shot baseline of every prompt method.
    """

    def __init__(self, path: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
        path = Path(path)
        adapter_dir, run_dir = _find_adapter(path)
        spec = read_spec(adapter_dir)
        config = read_run_config(run_dir) if run_dir else None
        self.path = path
        self._data_config = config
        self.config = config or TrainConfig(model=spec.base.name, progress=False)
        self.tokenizer = load_tokenizer(spec.base.name, trust_remote_code=trust_remote_code)
        if spec.task is not None:
            self.task = spec.task
        elif config is not None:  # format-1 adapters saved no task: rebuild it from the run's options
            self.task, _ = load_task(config, self.tokenizer, need_train=False, encoder_model=spec.base.is_encoder)
        else:
            raise PtuneError(f"{adapter_dir} records no task and has no run directory around it; "
                             "pass the run directory instead")
        self._splits: dict[str, list[dict]] | None = None
        # score at the precision the run trained and reported its metrics at (bf16 autocast where it had it)
        self.autocast = bf16_autocast if config is not None and run_precision(config) == "bf16" else None
        self.model: PtuneModel = load_adapter(adapter_dir, tokenizer=self.tokenizer,
                                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        self._ready()

    @classmethod
    def zero_shot(cls, cfg: TrainConfig, log: Any = None) -> "Run":
        """The task's template scored by the frozen LM through a verbalizer; nothing is trained."""
        task, splits = load_task(cfg, need_train=False)
        untrained = [name for name, k in HEAD_KINDS.items() if not k.new_weights and k.label_form == task.kind.label_form]
        if cfg.head != "auto":
            head = cfg.head
        else:  # the task's own head when it needs no training (probing), else the first that fits its labels
            head = task.head if task.head in untrained else next(iter(untrained), None)
        if head not in untrained:
            raise ConfigError(f"zero-shot evaluation needs a head that adds no weights ({', '.join(untrained) or 'none'} "
                              f"for task {task.name}); head={cfg.head!r} would be an untrained layer")
        cfg = dataclasses.replace(cfg, method="manual", method_options={}, head=head)
        run = cls.__new__(cls)
        run.path, run.config, run._data_config, run.autocast = None, cfg, cfg, None  # zero-shot: fp32
        run.tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
        encoder = model_is_encoder(cfg)
        run.task, run._splits = head_kind(head).resolve_labels(task, splits, run.tokenizer, causal=not encoder, log=log)
        run.model = build_model(cfg, run.task, run.tokenizer, encoder_model=encoder)
        run._ready()
        return run

    def _ready(self) -> None:
        self.model.eval()
        self.kind = head_kind(self.model.head_config.kind)
        # the spec's max length; format-1 adapters have none, so the run's options or the task's decide
        self.encoder = make_encoder(self.model, self.tokenizer, self.model.spec.max_length or self.config.max_length
                                    or self.task.max_length)

    @property
    def splits(self) -> dict[str, list[dict]]:
        """The run's data splits, loaded on first use (predict never needs them)."""
        if self._splits is None:
            if self._data_config is None:  # a bare adapter: no record of where its data came from
                self._splits = {}
            else:
                _, self._splits = load_task(self._data_config, self.tokenizer, need_train=False,
                                            encoder_model=self.model.spec.base.is_encoder)
        return self._splits

    def evaluate(self, split: str = "test", file: str | None = None, limit: int = 0) -> dict[str, float]:
        """Metrics on a split (or a labelled file); ``limit`` > 0 scores only the first N records."""
        if file:
            records = load_records(file, task=self.task)
        elif split in self.splits:
            records = self.splits[split]
        else:
            raise PtuneError(f"the task has no {split!r} split; pass --file with labelled data")
        examples = encode_records(self.task, self.encoder, records[:limit or None], kind=self.kind)
        rows = predict_logits(self.model, examples, batch_size=self.config.eval_batch_size,
                              pad_id=self.encoder.placeholder_id, autocast=self.autocast)
        return score(self.task, examples, rows)

    def predict(self, texts: list[str] | list[dict]) -> list[dict[str, Any]]:
        """One result per input: {"label", "probabilities"} (tagging: {"tokens", "tags"})."""
        task: Task = self.task
        records = [t if isinstance(t, dict) else self.kind.record_from_text(task, t) for t in texts]
        for i, r in enumerate(records):
            task.validate_record(r, f"input {i + 1}", allow_unlabeled=True)
        examples = encode_records(task, self.encoder, records, labelled=False, kind=self.kind)
        rows = predict_logits(self.model, examples, batch_size=self.config.eval_batch_size,
                              pad_id=self.encoder.placeholder_id, autocast=self.autocast)
        preds = decode_predictions(task, examples, rows)
        return [self.kind.result(task, rec, pred, rows[i]) for i, (rec, pred) in enumerate(zip(records, preds))]

    def generate(self, prompts: list[str], *, max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Continue each prompt with the adapter active (greedy unless ``do_sample=True`` etc.)."""
        if self.model.spec.base.kind != "causal_lm":
            raise PtuneError(f"generate needs a run on a causal LM with its LM head (a verbalizer or causal_lm head); "
                             f"this run's base is a {self.model.spec.base.kind.replace('_', ' ')}")
        field = self.task.text_fields[0]
        rows = [self.encoder.encode({field: p}) for p in prompts]
        batch = collate(rows, pad_id=self.encoder.placeholder_id, left=True)
        tok = self.tokenizer
        out = self.model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                                  max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **generate_kwargs)
        return [tok.decode(seq, skip_special_tokens=True) for seq in out]


def evaluate_zero_shot(cfg: TrainConfig, split: str = "test", file: str | None = None) -> dict[str, float]:
    """Metrics of the task's hand-written prompt with nothing trained (see :meth:`Run.zero_shot`)."""
    return Run.zero_shot(cfg).evaluate(split=split, file=file, limit=cfg.limit_eval)
