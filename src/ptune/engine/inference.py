"""Using a finished run: evaluate it, predict labels for new text, generate with it.

The model is rebuilt from the resolved spec saved with the adapter (base and how it was loaded,
head, template, method, task); the run's ``config.json`` is read only for where its data came from
(built-in task or files, split seed) when a split is evaluated.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..adapter_io import find_adapter, load_adapter, read_spec
from ..batching import collate
from ..data import Task, load_records
from ..errors import ConfigError, PtuneError
from ..heads import HEAD_KINDS, head_kind
from ..model import PtuneModel
from ..models import GENERATIVE_BASE_KINDS, load_tokenizer
from ..multitask import MultiTaskModel
from ..spec import MultiTaskSpec
from .build import (attach_frozen_work, build_model, encode_records, load_task, load_tasks, make_encoder,
                    model_is_encoder, weight_dtype)
from .config import TrainConfig
from ..scoring import score_rows
from .evaluate import decode_predictions, main_metric, score
from .generation import generate_and_score, stop_ids
from .precision import bf16_autocast, run_precision
from .run_dir import read_run_config


class Run:
    """A trained run directory (or an adapter folder) ready for inference.

    ``trust_remote_code`` / ``allow_pickle``: the consent a base loaded that way for training needs
    again. ``Run.zero_shot(cfg)`` gives the same interface for the task's hand-written prompt with
    nothing trained (method ``manual``; a verbalizer head on a classification task, the causal-LM head on a
    generation task): the zero-shot baseline of every prompt method.
    """

    def __init__(self, path: str | Path, *, task: str | None = None, trust_remote_code: bool = False,
                 allow_pickle: bool = False) -> None:
        path = Path(path)
        adapter_dir, run_dir = find_adapter(path)
        spec = read_spec(adapter_dir)
        config = read_run_config(run_dir) if run_dir else None
        self.path = path
        self._data_config = config
        self.config = config or TrainConfig(model=spec.base.name, progress=False)
        self.tokenizer = load_tokenizer(spec.base.name, trust_remote_code=trust_remote_code)
        self.autocast = bf16_autocast if config is not None and run_precision(config) == "bf16" else None
        self._splits: dict[str, list[dict]] | None = None
        self.tasks: dict[str, Run] = {}  # a multi-task run: one Run per task, sharing the model
        # the weights in the dtype the run computed in (fp32 on a CPU without bf16 arithmetic, see weight_dtype)
        dtype = weight_dtype(self.config)
        if isinstance(spec, MultiTaskSpec):
            model = load_adapter(adapter_dir, tokenizer=self.tokenizer, trust_remote_code=trust_remote_code,
                                 allow_pickle=allow_pickle, dtype=dtype)
            attach_frozen_work(model, self.config)
            self.tasks = {name: self._for_task(model, name) for name in spec.names}
            if task is not None:
                spec.task(task)  # names the tasks when it is not one of them
                self.__dict__.update(self.tasks[task].__dict__)
            else:
                self.model, self.task = model, None
            return
        if task is not None and (spec.task is None or task != spec.task.name):
            raise ConfigError(f"--task {task}: this run answers {spec.task.name if spec.task else 'one task'} only; "
                              "--task picks one task of a multi-task run")
        if spec.task is not None:
            self.task = spec.task
        elif config is not None:  # format-1 adapters saved no task: rebuild it from the run's options
            self.task, _ = load_task(config, self.tokenizer, need_train=False, encoder_model=spec.base.is_encoder)
        else:
            raise PtuneError(f"{adapter_dir} records no task and has no run directory around it; "
                             "pass the run directory instead")
        # scores at the precision the run trained and reported its metrics at (bf16 autocast where it had it)
        self.model: PtuneModel = load_adapter(adapter_dir, tokenizer=self.tokenizer, dtype=dtype,
                                              trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
        attach_frozen_work(self.model, self.config)
        merge = getattr(self.model.adapter, "merge", None)
        if merge is not None and self.model.spec.base.quantize is None:
            merge(keep_original=True)  # one adapter on its base: its low-rank update costs nothing merged in
        self._ready()

    def _for_task(self, model: MultiTaskModel, name: str) -> "Run":
        """A Run answering one task of a multi-task model through its view."""
        run = Run.__new__(Run)
        run.__dict__.update(self.__dict__)
        run.tasks, run.model, run.task = {}, model.view(name), model.spec.task(name).task
        run._ready()
        return run

    def _one_task(self) -> None:
        if self.task is None:
            raise PtuneError(f"this run answers tasks {', '.join(self.tasks)}: name one (Python: Run(path, "
                             "task=NAME) or run.tasks[NAME]; CLI: --task NAME)")

    @classmethod
    def zero_shot(cls, cfg: TrainConfig, log: Any = None) -> "Run":
        """The task's template scored by the frozen LM through a verbalizer; nothing is trained."""
        task, splits = load_task(cfg, need_train=False)
        untrained = [name for name, k in HEAD_KINDS.items() if not k.new_weights and k.fits_labels_of(task.kind)]
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
        run.tasks = {}
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
            self._one_task()
            config = self._data_config
            if config is None:  # a bare adapter: no record of where its data came from
                self._splits = {}
            else:
                loaded = load_tasks(config, self.tokenizer, need_train=False, encoder_model=self.model.spec.base.is_encoder)
                self._splits = next((s for t, s in loaded if t.name == self.task.name), {})
        return self._splits

    def evaluate(self, split: str = "test", file: str | None = None, limit: int = 0) -> dict[str, float]:
        """Metrics on a split (or a labelled file); ``limit`` > 0 scores only the first N records. A
        multi-task run reports every task (``task/metric``) and ``mean_score``; a prompt ensemble adds
        each member's main metric (``member_k_<metric>``)."""
        if self.tasks and self.task is None:
            if file:
                self._one_task()
            metrics: dict[str, float] = {}
            mains = []
            for name, run in self.tasks.items():
                got = run.evaluate(split, limit=limit)
                metrics.update({f"{name}/{k}": v for k, v in got.items()})
                mains.append(got[main_metric(run.task)[0]])
            metrics["mean_score"] = sum(mains) / len(mains)
            return metrics
        records = self._records(split, file)
        examples = encode_records(self.task, self.encoder, records[:limit or None], kind=self.kind)
        members = self._members()
        rows = score_rows(self.model, examples, batch_size=self.config.eval_batch_size,
                              pad_id=self.encoder.placeholder_id, autocast=self.autocast, members=members)
        return score(self.task, examples, rows, members)

    def _records(self, split: str, file: str | None) -> list[dict]:
        if file:
            return load_records(file, task=self.task)
        if split in self.splits:
            return self.splits[split]
        raise PtuneError(f"the task has no {split!r} split; pass --file with labelled data")

    def evaluate_generation(self, split: str = "test", file: str | None = None, limit: int = 0,
                            max_new_tokens: int | None = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Evaluation by generation (``ptune eval --generate``): the metrics of :meth:`evaluate` (loss, perplexity)
        beside ROUGE-1/2/L and BLEU-4 of greedy answers to the split's prompts (``limit`` > 0: the first N), and
        per record ``{"input", "reference", "prediction"}`` (see :mod:`ptune.engine.generation`)."""
        self._one_task()
        if not self.kind.generates:
            writers = ", ".join(name for name, k in HEAD_KINDS.items() if k.generates)
            raise ConfigError(f"--generate scores text the model writes; this run's {self.kind.name} head does not write "
                              f"text (heads that do: {writers}): evaluate it without --generate")
        metrics = self.evaluate(split, file, limit)
        records = self._records(split, file)[:limit or None]
        scores, predictions = generate_and_score(
            self.model, self.tokenizer, self.task, self.encoder, records, max_new_tokens=max_new_tokens,
            batch_rows=self.config.eval_batch_size, autocast=self.autocast)
        return {**metrics, **scores, "generated": len(predictions)}, predictions

    def _members(self) -> list[dict[int, Any]] | None:
        return [{} for _ in range(self.model.spec.ensemble)] if self.model.spec.ensemble > 1 else None

    def predict(self, texts: list[str] | list[dict], *, vote: str = "mean") -> list[dict[str, Any]]:
        """One result per input: {"label", "probabilities"} (tagging: {"tokens", "tags"}).

        A prompt ensemble answers with its members' mean probabilities (``vote="mean"``) or the label
        most members pick (``vote="majority"``, ties to the higher mean probability); its results add
        ``members``, each member's label.
        """
        if vote not in ("mean", "majority"):
            raise ConfigError(f"vote={vote!r} must be mean or majority")
        self._one_task()
        task: Task = self.task
        records = [t if isinstance(t, dict) else self.kind.record_from_text(task, t) for t in texts]
        for i, r in enumerate(records):
            task.validate_record(r, f"input {i + 1}", allow_unlabeled=True)
        if self.kind.generates:  # a seq2seq run answers by writing its target (greedy)
            return [self.kind.result(task, rec, text, None) for rec, text in zip(records, self._generate(records, max_new_tokens=self.encoder.max_length))]
        examples = encode_records(task, self.encoder, records, labelled=False, kind=self.kind)
        members = self._members()
        if members is None and vote == "majority":
            raise ConfigError("vote=majority needs a prompt ensemble (a run trained with --ensemble K)")
        if members is not None and vote == "majority" and not self.kind.one_label:
            raise ConfigError(f"vote=majority picks one label per input; a {self.kind.name} head answers per token")
        rows = score_rows(self.model, examples, batch_size=self.config.eval_batch_size,
                              pad_id=self.encoder.placeholder_id, autocast=self.autocast, members=members)
        preds = decode_predictions(task, examples, rows)
        results = [self.kind.result(task, rec, pred, rows[i]) for i, (rec, pred) in enumerate(zip(records, preds))]
        if members is not None:
            for i, result in enumerate(results):
                picks = [self.kind.decode(task, examples[i], m[i]) for m in members]
                result["members"] = picks
                if vote == "majority":
                    counts = {p: picks.count(p) for p in picks}
                    top = max(counts.values())
                    probs = result["probabilities"]
                    result["label"] = max((p for p in counts if counts[p] == top), key=lambda p: probs[p])
        return results

    def generate(self, prompts: list[str], *, max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        """Continue each prompt with the adapter active (greedy unless ``do_sample=True`` etc.)."""
        self._one_task()
        if self.model.spec.base.kind not in GENERATIVE_BASE_KINDS:
            raise PtuneError(f"generate needs a run on a causal LM with its LM head (a verbalizer or causal_lm head) "
                             f"or on an encoder-decoder (seq2seq head); this run's base is a "
                             f"{self.model.spec.base.kind.replace('_', ' ')}")
        field = self.task.text_fields[0]
        return self._generate([{field: p} for p in prompts], max_new_tokens=max_new_tokens, **generate_kwargs)

    def _generate(self, records: list[dict], *, max_new_tokens: int = 32, **generate_kwargs: Any) -> list[str]:
        rows = [self.encoder.encode(r) for r in records]
        batch = collate(rows, pad_id=self.encoder.placeholder_id, left=True)
        tok = self.tokenizer
        generate_kwargs.setdefault("eos_token_id", stop_ids(self.model, tok))  # a chat turn's end too (Gemma)
        out = self.model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],
                                  max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **generate_kwargs)
        return [tok.decode(seq, skip_special_tokens=True) for seq in out]


def evaluate_zero_shot(cfg: TrainConfig, split: str = "test", file: str | None = None) -> dict[str, float]:
    """Metrics of the task's hand-written prompt with nothing trained (see :meth:`Run.zero_shot`)."""
    return Run.zero_shot(cfg).evaluate(split=split, file=file, limit=cfg.limit_eval)
