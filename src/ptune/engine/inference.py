"""Using a finished run: evaluate it, predict labels for new text, generate with it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from ..api import CONFIG_NAME, load_adapter
from ..data import load_records
from ..errors import ConfigError, PtuneError
from ..model import PtuneModel
from ..models import load_tokenizer
from .build import build_model, encode_records, load_task, make_encoder
from .config import TrainConfig
from .evaluate import decode_predictions, predict_logits, score


class Run:
    """A trained run directory (or a bare adapter folder) ready for inference.

    ``Run.zero_shot(cfg)`` gives the same interface for the task's hand-written prompt with nothing
    trained (method ``manual``, verbalizer head): the zero-shot baseline of every prompt method.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if (path / "config.json").is_file() and (path / "best" / CONFIG_NAME).is_file():
            config = TrainConfig.from_dict(json.loads((path / "config.json").read_text()))
            adapter_dir = path / "best"
        elif (path / CONFIG_NAME).is_file() and (path.parent / "config.json").is_file():
            config = TrainConfig.from_dict(json.loads((path.parent / "config.json").read_text()))
            adapter_dir = path
        else:
            raise PtuneError(f"{path} is not a finished ptune run (no config.json with best/{CONFIG_NAME}); "
                             "pass the --output-dir of a completed `ptune train`")
        self.path = path
        self._setup(config, lambda: load_adapter(adapter_dir, tokenizer=self.tokenizer, base_name=config.model))

    @classmethod
    def zero_shot(cls, cfg: TrainConfig, log: Any = None) -> "Run":
        """The task's template scored by the frozen LM through a verbalizer; nothing is trained."""
        if cfg.head not in ("auto", "verbalizer"):
            raise ConfigError(f"zero-shot evaluation scores label words with the LM (head verbalizer); "
                              f"head={cfg.head!r} would be an untrained layer")
        cfg = dataclasses.replace(cfg, method="manual", method_options={}, head="verbalizer")
        run = cls.__new__(cls)
        run.path = None
        run._setup(cfg, lambda: build_model(cfg, run.task, run.tokenizer), need_train=False, log=log)
        return run

    def _setup(self, config: TrainConfig, make_model: Any, need_train: bool = True, log: Any = None) -> None:
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.task, self.splits = load_task(config, self.tokenizer, need_train=need_train, log=log)
        self.model: PtuneModel = make_model()
        self.model.eval()
        self.encoder = make_encoder(self.model, self.tokenizer, config.max_length or self.task.max_length)

    def evaluate(self, split: str = "test", file: str | None = None, limit: int = 0) -> dict[str, float]:
        """Metrics on a split (or a labelled file); ``limit`` > 0 scores only the first N records."""
        if file:
            records = load_records(file, task=self.task)
        elif split in self.splits:
            records = self.splits[split]
        else:
            raise PtuneError(f"the task has no {split!r} split; pass --file with labelled data")
        examples = encode_records(self.task, self.encoder, records[:limit or None])
        logits = predict_logits(self.model, examples, batch_size=self.config.eval_batch_size,
                                pad_id=self.encoder.placeholder_id)
        return score(self.task, examples, logits)

    def predict(self, texts: list[str] | list[dict]) -> list[dict[str, Any]]:
        """One result per input: {"label", "probabilities"} (tagging: {"tokens", "tags"})."""
        task = self.task
        records = []
        for t in texts:
            if isinstance(t, dict):
                records.append(t)
            elif task.task_type == "tagging":
                records.append({task.text_fields[0]: t.split()})
            else:
                records.append({task.text_fields[0]: t})
        for i, r in enumerate(records):
            task.validate_record(r, f"input {i + 1}", allow_unlabeled=True)
        examples = encode_records(task, self.encoder, records, labelled=False)
        logits = predict_logits(self.model, examples, batch_size=self.config.eval_batch_size,
                                pad_id=self.encoder.placeholder_id)
        preds = decode_predictions(task, examples, logits)
        out = []
        for i, (rec, pred) in enumerate(zip(records, preds)):
            if task.task_type == "tagging":
                out.append({"tokens": rec[task.text_fields[0]], "tags": pred})
            else:
                probs = torch.softmax(logits[i][0], -1).tolist()
                out.append({"label": pred, "probabilities": dict(zip(task.labels, probs))})
        return out

    def generate(self, prompts: list[str], *, max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Continue each prompt with the adapter active (greedy unless ``do_sample=True`` etc.)."""
        if self.model.fingerprint.get("is_encoder", True) or not self.model.head_config.needs_lm:
            raise PtuneError("generate needs a run on a causal LM with a verbalizer or causal_lm head")
        field = self.task.text_fields[0]
        rows = [self.encoder.encode({field: p}) for p in prompts]
        from ..batching import collate

        batch = collate(rows, pad_id=self.encoder.placeholder_id, left=True)
        tok = self.tokenizer
        out = self.model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                                  max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **generate_kwargs)
        return [tok.decode(seq, skip_special_tokens=True) for seq in out]


def evaluate_zero_shot(cfg: TrainConfig, split: str = "test", file: str | None = None) -> dict[str, float]:
    """Metrics of the task's hand-written prompt with nothing trained (see :meth:`Run.zero_shot`)."""
    return Run.zero_shot(cfg).evaluate(split=split, file=file, limit=cfg.limit_eval)

