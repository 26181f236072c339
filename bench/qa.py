"""Extractive QA on the built-in ``geo-qa`` task: P-Tuning v2, LoRA and full fine-tuning on MiniLM (issue #16).

    python bench/qa.py [--methods p_tuning_v2,lora,full] [--max-steps 300] [--max-minutes 5]
                       [--batch-size 16] [--limit-train 0] [--limit-eval 0] [--limit-test 0]
                       [--out bench/results/qa.json]

Task: ``geo-qa`` (``ptune.data.geo_qa``: templated sentences of real GeoNames country facts, about a
quarter of the questions unanswerable; split by country, seed 13). Head: ``span_qa`` (a new linear layer
giving start / end logits on every position; SQuAD exact match and token F1, no-answer = ""). Base:
MiniLM (``minilm``, all-MiniLM-L6-v2, 22.7M parameters). Every method trains through
``ptune.engine.train`` with the same data, batch size, step budget and seed, at its own default learning
rate unless ``--lr-<method>`` is given; each run stops at ``--max-steps`` or ``--max-minutes``, whichever
comes first, keeps its best validation F1 adapter, and that adapter is scored on the test split.

Baselines in the table: "always no answer" (the EM / F1 of predicting "" everywhere, i.e. the share of
unanswerable test questions). Raw results go to the JSON file, a table to the .md beside it. Runs live in
bench/runs/qa/.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from ptune.data import load_builtin
from ptune.engine import Run, TrainConfig, train
from ptune.metrics import squad_scores

ROOT = Path("bench/runs/qa")
SEED = 13
OPTIONS = {"p_tuning_v2": {"num_virtual_tokens": 16, "layers": "all"}, "lora": {"r": 8, "alpha": 16}, "full": {}}


def run_method(method: str, args: argparse.Namespace) -> dict:
    run_dir = ROOT / method
    lr = getattr(args, f"lr_{method}")
    cfg = TrainConfig(model="minilm", task="geo-qa", method=method, method_options=OPTIONS[method],
                      max_steps=args.max_steps, max_minutes=args.max_minutes, batch_size=args.batch_size,
                      eval_batch_size=32, lr=lr, warmup_ratio=0.06, eval_every=max(1, args.max_steps // 3),
                      limit_train=args.limit_train, limit_eval=args.limit_eval, seed=SEED, progress=False,
                      overwrite=True, output_dir=str(run_dir))
    summary = train(cfg)
    run = Run(run_dir)
    started = time.perf_counter()
    test = run.evaluate("test", limit=args.limit_test)  # the run's own test line obeys limit_eval; this does not
    _, splits = load_builtin("geo-qa", seed=SEED)
    sample = splits["test"][0]
    return {"method": method, "options": OPTIONS[method], "lr": cfg.learning_rate, "steps": summary["steps"],
            "stopped": summary.get("stopped"), "best_validation_f1": summary.get("best_validation_f1"),
            "trainable_parameters": summary["trainable_parameters"],
            "trainable_percent": summary["trainable_percent"],
            "train_seconds": summary["train_seconds_this_session"], "test": test,
            "test_seconds": time.perf_counter() - started,
            "predict_example": {"question": sample["question"], "gold": sample["answers"]["text"],
                                **run.predict([{"question": sample["question"], "context": sample["context"]}])[0]}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="p_tuning_v2,lora,full")
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=5.0, help="time budget per run (0: none)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit-train", type=int, default=0, help="first N training questions only (0: all)")
    ap.add_argument("--limit-eval", type=int, default=0, help="validation questions scored during training (0: all)")
    ap.add_argument("--limit-test", type=int, default=0, help="test questions scored (0: all)")
    for method in OPTIONS:
        ap.add_argument(f"--lr-{method.replace('_', '-')}", dest=f"lr_{method}", type=float, default=None)
    ap.add_argument("--out", default="bench/results/qa.json")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(OPTIONS))
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {sorted(OPTIONS)}")

    task, splits = load_builtin("geo-qa", seed=SEED)
    test = splits["test"][:args.limit_test or None]
    golds = [r["answers"]["text"] for r in test]
    result: dict = {"command": " ".join(["python bench/qa.py", *sys.argv[1:]]), "task": task.name, "model": "minilm", "seed": SEED, "max_length": task.max_length,
                    "questions": {k: len(v) for k, v in splits.items()},
                    "unanswerable": {k: sum(not r["answers"]["text"] for r in v) for k, v in splits.items()},
                    "max_steps": args.max_steps, "max_minutes": args.max_minutes, "batch_size": args.batch_size,
                    "limits": {"train": args.limit_train, "eval": args.limit_eval, "test": args.limit_test},
                    "always_no_answer": squad_scores([""] * len(test), golds), "runs": []}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}), flush=True)
    ROOT.mkdir(parents=True, exist_ok=True)
    for method in methods:
        got = run_method(method, args)
        result["runs"].append(got)
        print(json.dumps(got), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    out.with_suffix(".md").write_text(table(result, out))


def table(r: dict, out: Path) -> str:
    base = r["always_no_answer"]
    lines = [
        "# geo-qa: extractive QA on MiniLM (P-Tuning v2, LoRA, full fine-tuning)", "",
        f"Command: `{r.get('command', 'python bench/qa.py')}`; raw results: `{out}`. Task `geo-qa` (templated GeoNames country facts, "
        f"not SQuAD): {r['questions']['train']} / {r['questions']['validation']} / {r['questions']['test']} "
        f"questions (train / validation / test, split by country), {r['unanswerable']['test']} of the test "
        f"questions unanswerable. Max length {r['max_length']}, batch {r['batch_size']}, at most "
        f"{r['max_steps']} steps or {r['max_minutes']:g} minutes per run, seed {r['seed']}; the best validation "
        "F1 adapter is scored. EM / F1: SQuAD's normalisation, no answer = \"\", in [0, 1].", "",
        "| method | trainable | lr | steps | train s | test EM | test F1 | F1 answerable | EM unanswerable |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| always \"no answer\" | - | - | - | - | {base['exact_match']:.3f} | {base['f1']:.3f} | 0.000 | 1.000 |",
    ]
    for x in r["runs"]:
        t = x["test"]
        lines.append(f"| {x['method']} {x['options'] or ''} | {x['trainable_percent']:.3f}% | {x['lr']:g} | "
                     f"{x['steps']}{' (time)' if x['stopped'] else ''} | {x['train_seconds']:.0f} | "
                     f"{t['exact_match']:.3f} | {t['f1']:.3f} | {t.get('has_answer_f1', float('nan')):.3f} | "
                     f"{t.get('no_answer_exact', float('nan')):.3f} |")
    if any(r["limits"].values()):
        lines += ["", f"Limits in force (first N questions): {r['limits']}."]
    lines += ["", "Seconds are wall time on a shared 2-core CPU: read them as an upper bound.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
