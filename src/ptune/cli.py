"""The ``ptune`` command: argument parsing only; every command is one call into the Python API.

Flags are generated (``ptune.options``) from :class:`TrainConfig`, from the method configs (one group
per method) and from the server's :class:`~ptune.serve.schemas.Limits`: names, types, defaults and help
from the fields and their docstrings, so a YAML key, a flag (``--num-virtual-tokens 16``) and the Python
field always share one name, one type and one description. User mistakes print one line
(``ptune: error: ...``) and exit with status 2; an interrupted run exits with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, NoReturn, Sequence

import transformers
from accelerate import PartialState

from .adapter_set import predict_mixed
from .data import load_records
from .engine import Run, TrainConfig, train
from .errors import ConfigError, PtuneError, TrainingInterrupted
from .export import export
from .options import (add_config_flags, add_field_flag, add_train_options, fields_in_source, flag, methods_named,
                      train_values)
from .studies.cli import add_study_parsers
from .version import __version__

LIMITS_SOURCE = Path(__file__).parent / "serve" / "schemas.py"  # Limits, read without importing the serve extra


class Parser(argparse.ArgumentParser):
    """argparse whose mistakes (an unknown flag, a value of the wrong type) are one line too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ptune: error: {message} (see {self.prog} --help)\n")


def _train_parser(sub: Any, shown: Sequence[str] | None) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train an adapter (defaults: P-Tuning v2, MiniLM, bbc)",
                       description="Train an adapter. With no arguments: P-Tuning v2 on the packaged MiniLM "
                                   "model and the built-in bbc task.")
    p.add_argument("--config", help="YAML file of options (flags override it)")
    add_train_options(p, shown=shown)
    return p


def _train(args: argparse.Namespace) -> int:
    plain = train_values(args)
    options = plain.pop("method_options")
    if args.config:
        cfg = TrainConfig.from_yaml(args.config, **plain, method_options=options)
    else:
        cfg = TrainConfig.from_dict({**plain, "method_options": options})
    summary = train(cfg)
    if not PartialState().is_main_process:  # under accelerate launch the closing lines are said once
        return 0
    key = next(k for k in summary if k.startswith("best_validation_"))
    print(f"ptune: done. {key.replace('_', ' ')} = {summary[key]:.4f} (step {summary['best_step']})")
    if summary.get("test"):
        print("ptune: test: " + ", ".join(f"{k} {v:.4f}" for k, v in summary["test"].items()))
    print(f"ptune: adapter: {summary['adapter']}")
    print(f"ptune: metrics: {os.path.join(summary['run_dir'], 'metrics.jsonl')}, summary: "
          f"{os.path.join(summary['run_dir'], 'summary.json')}")
    return 0


RUN_CONSENT = ("trust_remote_code", "allow_pickle")  # a run's base loaded this way needs the consent again
ZERO_SHOT_FIELDS = ("model", "task", "template", "max_length", "eval_batch_size", "validation_file", "test_file",
                    "quantize", "seed", "trust_remote_code", "allow_pickle")


def _zero_shot_options(p: argparse.ArgumentParser) -> None:
    """``run`` or ``--zero-shot`` plus the TrainConfig fields a zero-shot model needs."""
    p.add_argument("run", nargs="?", help="run directory (the --output-dir of ptune train)")
    group = p.add_argument_group("zero-shot: the task's hand-written prompt, nothing trained (instead of RUN)")
    group.add_argument("--zero-shot", action="store_true",
                       help="score the task template's label words with the frozen LM (verbalizer)")
    add_config_flags(group, ZERO_SHOT_FIELDS, dest_prefix="zs.")


def _open_run(args: argparse.Namespace) -> Any:
    options = {k[3:]: v for k, v in vars(args).items() if k.startswith("zs.")}
    if args.zero_shot == bool(args.run):
        raise ConfigError("give either a run directory or --zero-shot (with --model and --task), not both")
    if args.run:
        consent = {k: options.pop(k) for k in RUN_CONSENT if k in options}
        task = options.pop("task", None)  # with a run: one task of a multi-task run
        if options:
            raise ConfigError(f"{', '.join(flag(k) for k in options)} only apply with --zero-shot; "
                              "a run keeps the settings it was trained with")
        return Run(args.run, task=task, **consent)
    say = lambda line: print(f"ptune: {line}", file=sys.stderr)  # noqa: E731
    return Run.zero_shot(TrainConfig.from_dict(options), log=say)


def _eval(args: argparse.Namespace) -> int:
    if not args.generate and (args.output or args.max_new_tokens):
        raise ConfigError(f"{'--output' if args.output else '--max-new-tokens'} goes with --generate")
    run = _open_run(args)
    if not args.generate:
        metrics = run.evaluate(split=args.split, file=args.file, limit=args.limit)
        print(json.dumps(metrics, indent=2))
        return 0
    metrics, predictions = run.evaluate_generation(split=args.split, file=args.file, limit=args.limit,
                                                   max_new_tokens=args.max_new_tokens)
    source = Path(args.file).stem if args.file else args.split
    if args.output:
        path = Path(args.output)
    elif args.run:
        path = Path(args.run) / f"predictions-{source}.jsonl"
    else:  # zero-shot: no run directory to write into
        path = Path(f"predictions-zero-shot-{run.task.name}-{source}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions), encoding="utf-8")
    os.replace(tmp, path)
    print(json.dumps({**metrics, "predictions": str(path)}, indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    if args.adapter:  # several runs on one base, each input line naming its adapter
        return _predict_mixed(args)
    if args.input:
        raise ConfigError("--input reads rows that name their adapter; give the adapters with --adapter "
                          "(or label a file with one run: --file)")
    if args.zero_shot and args.run:  # no run directory: the first positional is a text
        args.text, args.run = [args.run, *args.text], None
    run = _open_run(args)
    inputs: list = list(args.text)
    if args.file:
        inputs += load_records(args.file)
    if not inputs:
        raise ConfigError("give some text to label, or --file")
    for result in run.predict(inputs, vote=args.vote):
        _print_result(result, args.json)
    return 0


def _print_result(result: dict, as_json: bool, prefix: str = "") -> None:
    if as_json:
        print(json.dumps(result))
    elif "error" in result:
        print(f"{prefix}error: {result['error']}")
    elif "tags" in result:
        print(prefix + " ".join(f"{t}/{g}" for t, g in zip(result["tokens"], result["tags"])))
    elif "generated" in result:  # seq2seq: the text the model wrote
        print(prefix + result["generated"])
    elif "answer" in result:  # span QA: the answer ("" = no answer) and its score
        print(f"{prefix}{result['answer'] or '(no answer)'}\t{result['score']:.3f}")
    else:
        probs = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])[:5]  # the top 5
        print(f"{prefix}{result['label']}\t" + "  ".join(f"{k}={v:.3f}" for k, v in probs))


def _predict_mixed(args: argparse.Namespace) -> int:
    if args.run or args.text or args.zero_shot or args.file:
        raise ConfigError("with --adapter, give the inputs as --input FILE (each row names its adapter: "
                          '{"adapter": "bbc", "text": "..."}), not a run or texts')
    if not args.input:
        raise ConfigError('--adapter needs --input FILE, rows like {"adapter": "bbc", "text": "..."}')
    options = {k[3:]: v for k, v in vars(args).items() if k.startswith("zs.")}
    consent = {k: options.pop(k) for k in RUN_CONSENT if k in options}
    if options:
        raise ConfigError(f"{', '.join(flag(k) for k in options)} do not apply to --adapter runs")
    for result in predict_mixed(args.adapter, args.input, batch_size=args.batch_size, **consent):
        _print_result(result, args.json, f"{result['adapter']}\t")
    return 0


def _generate(args: argparse.Namespace) -> int:
    options = {"do_sample": args.temperature > 0}
    if args.temperature > 0:
        options.update(temperature=args.temperature, top_p=args.top_p)
    consent = {k: getattr(args, k) for k in RUN_CONSENT}
    for text in Run(args.run, **consent).generate(args.prompt, max_new_tokens=args.max_new_tokens, **options):
        print(text)
    return 0


def _export(args: argparse.Namespace) -> int:
    result = export(args.run, args.output, args.format, overwrite=args.overwrite, strict=args.strict,
                    trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle, warn=False)
    print(f"ptune: exported {result.format} to {result.path}")
    print(f"ptune: load it with {result.client}")
    for note in result.notes:
        print(f"ptune: note: {note}")
    if result.exact:
        measured = "" if result.max_abs_diff is None else \
            f" (largest logit difference on the probe inputs: {result.max_abs_diff:.3g})"
        print(f"ptune: the client reproduces ptune's outputs{measured}")
    else:
        print(f"ptune: warning: {result.message()}", file=sys.stderr)
    return 0


def _serve(args: argparse.Namespace) -> int:
    try:
        from .serve import serve
    except ImportError as e:
        raise ConfigError(f"ptune serve needs FastAPI, uvicorn and prometheus-client ({e.name} is missing): "
                          "pip install 'ptune[serve]' (or ./install.sh serve)") from None
    limits = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("limit.")}
    options = {k: getattr(args, k) for k in ("allow_admin", "batching", "dtype", *RUN_CONSENT)}
    return serve(args.adapters, host=args.host, port=args.port, log_level=args.log_level, **limits, **options)


def _serve_parser(sub: Any) -> argparse.ArgumentParser:
    sv = sub.add_parser("serve", help="serve runs over HTTP: one base, requests of all adapters batched together",
                        description="Serve finished runs (or adapter folders) over HTTP on one frozen base: POST "
                                    "/v1/predict, /v1/generate (causal-LM runs), GET /v1/adapters, /health, /metrics, "
                                    "a playground at / and the API docs at /docs. Needs the serve extra.")
    sv.add_argument("adapters", nargs="+", metavar="[NAME=]RUN", help="run directories or adapter folders (named after "
                    "their folder unless NAME= is given)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port, printed)")
    limits = sv.add_argument_group("limits (ptune.serve.Limits)")
    for f in fields_in_source(LIMITS_SOURCE, "Limits"):
        add_field_flag(limits, f.name, f.annotation, f.default, f.doc, dest=f"limit.{f.name}", keep_default=True)
    sv.add_argument("--batching", choices=("mixed", "per-adapter"), default="mixed", help="mixed (default): "
                    "requests of any adapters share one forward pass; per-adapter: one adapter per forward pass "
                    "(how a server of one adapter at a time batches; for comparison)")
    sv.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "saved"), default="auto", help="the base's "
                    "weights: auto (default): float32 on a CPU where the base or an adapter generates, so a greedy "
                    "answer does not depend on which requests share its decoding step (bf16 rounds differently at "
                    "other batch shapes); float32, bfloat16; saved: as the base's folder holds it")
    sv.add_argument("--allow-admin", action="store_true", help="allow POST /v1/adapters and DELETE "
                    "/v1/adapters/NAME (load and unload adapters at run time)")
    sv.add_argument("--log-level", default="info", help="uvicorn's log level (default info)")
    sv.add_argument("--trust-remote-code", action="store_true", help="the runs' base was loaded with remote code")
    sv.add_argument("--allow-pickle", action="store_true", help="the runs' base has pickle weight files")
    return sv


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``ptune`` parser. ``argv``, when given, only shapes the help: a method named there
    (``--method lora``, ``--methods lora,bitfit``) shows its option group alone; every flag parses either way."""
    shown = methods_named(argv)
    parser = Parser(prog="ptune", description="Parameter-efficient fine-tuning centred on P-Tuning.")
    parser.add_argument("--version", action="version", version=f"ptune {__version__}")
    sub = parser.add_subparsers(dest="command")
    _train_parser(sub, shown).set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a finished run (or a zero-shot prompt) on a split or a file",
                       description="Evaluate a finished run, or with --zero-shot the task's hand-written prompt "
                                   "on a frozen LM (e.g. ptune eval --zero-shot --model gemma --task lama-capital).")
    _zero_shot_options(e)
    e.add_argument("--split", default="test", help="validation or test (default test)")
    e.add_argument("--file", help="a labelled data file instead of a split")
    e.add_argument("--limit", type=int, default=0, help="score only the first N records (default 0: all)")
    gen = e.add_argument_group("evaluation by generation (causal_lm and seq2seq runs)")
    gen.add_argument("--generate", action="store_true",
                     help="also answer each record by greedy generation: ROUGE-1/2/L and BLEU-4 against its target, "
                          "and a predictions file (input, reference, prediction per line)")
    gen.add_argument("--max-new-tokens", type=int, default=None,
                     help="with --generate: the longest answer in tokens (default: the task's max_target_length, else 64)")
    gen.add_argument("--output", help="with --generate: the predictions file (default RUN/predictions-SPLIT.jsonl; "
                                      "zero-shot: ./predictions-zero-shot-TASK-SPLIT.jsonl)")
    e.set_defaults(func=_eval)
    pr = sub.add_parser("predict", help="label new text with a finished run (or a zero-shot prompt)")
    _zero_shot_options(pr)
    pr.add_argument("text", nargs="*", help="texts to label")
    pr.add_argument("--file", help="a data file of records to label")
    pr.add_argument("--json", action="store_true", help="one JSON object per line")
    pr.add_argument("--adapter", action="append", metavar="[NAME=]RUN",
                    help="several runs on one frozen base (repeat the flag); rows of --input name their adapter "
                         "and are scored together in mixed batches")
    pr.add_argument("--input", help='with --adapter: a JSONL/CSV/JSON file of rows {"adapter": NAME, "text": ...}')
    pr.add_argument("--batch-size", type=int, default=32, help="with --adapter: rows per mixed batch")
    pr.add_argument("--vote", choices=("mean", "majority"), default="mean",
                    help="a prompt ensemble's answer: mean probability (default) or the members' majority label")
    pr.set_defaults(func=_predict)
    g = sub.add_parser("generate", help="continue prompts with a finished causal-LM run (or answer them: seq2seq)")
    g.add_argument("run", help="run directory")
    g.add_argument("prompt", nargs="+", help="prompts to continue; each fills the run's template (its first field)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; > 0 samples")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--trust-remote-code", action="store_true", help="the run's base was loaded with remote code")
    g.add_argument("--allow-pickle", action="store_true", help="the run's base has pickle weight files")
    g.set_defaults(func=_generate)
    x = sub.add_parser("export", help="export a run to HF PEFT or to a merged transformers model",
                       description="Export a finished run (or an adapter folder) for its real clients: --format peft "
                                   "for peft.PeftModel.from_pretrained, --format merged for a plain transformers "
                                   "folder (weight-side methods). Says whether the client reproduces ptune's outputs "
                                   "and, where not, why and by how much (also in ptune_export.json).")
    x.add_argument("run", help="run directory or adapter folder")
    x.add_argument("--format", default="peft", help="peft (default) or merged")
    x.add_argument("--output", help="folder to write (default: RUN/export-FORMAT)")
    x.add_argument("--overwrite", action="store_true", help="replace a previous export in --output")
    x.add_argument("--strict", action="store_true", help="refuse an export whose client differs from ptune")
    x.add_argument("--trust-remote-code", action="store_true", help="the run's base was loaded with remote code")
    x.add_argument("--allow-pickle", action="store_true", help="the run's base has pickle weight files")
    x.set_defaults(func=_export)
    _serve_parser(sub).set_defaults(func=_serve)
    add_study_parsers(sub, shown)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except PtuneError as e:
        print(f"ptune: error: {e}", file=sys.stderr)
        return 130 if isinstance(e, TrainingInterrupted) else 2


if __name__ == "__main__":
    sys.exit(main())
