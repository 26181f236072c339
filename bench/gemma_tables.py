""""GPT understands, too" on this machine: the packaged Gemma 3 270M (a frozen causal LM) with
hand-written prompts against trained continuous prompts.

Two tables, both scored on held-out test data:

1. Knowledge probing (``lama-capital``, ``lama-city-country``, ``lama-continent``; test subjects never
   seen in training): precision@1 of the manual prompt (zero-shot, nothing trained) and of
   P-Tuning v1 (10 virtual tokens before the manual prompt, LSTM encoder, base frozen).
2. ``bbc`` topic classification through a verbalizer (label words scored at the next token):
   zero-shot manual prompt, prompt tuning, P-Tuning with anchors, LoRA.

Every trained row picks its best epoch on validation, then reports test. Run directories go under
``--runs`` (default a temporary folder). About 25 minutes on 2 CPU cores with the defaults (23 measured).

    python bench/gemma_tables.py --out bench/results_gemma_tables.md
    python bench/gemma_tables.py --tables probing   # only the probing table (about 6 minutes)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

RELATIONS = ("capital", "city-country", "continent")
# bbc rows: label, method, method options, template (None: the task's hand-written prompt)
BBC_ROWS = [
    ("prompt tuning", "prompt_tuning", {"num_virtual_tokens": 10}, None),
    # a real anchor word must stay right before {mask}: the label is read at that position
    ("P-Tuning (anchors)", "p_tuning", {}, "[P:4]{text}\n[P:4]This news article is about{mask}"),
    ("LoRA (q, v; r 8)", "lora", {}, None),
]


def probing_table(args: argparse.Namespace, runs: Path) -> list[dict]:
    from ptune.data.probing import RELATIONS as MANUAL_PROMPTS
    from ptune.engine import TrainConfig, evaluate_zero_shot, train

    rows = []
    for rel in RELATIONS:
        task = f"lama-{rel}"
        t0 = time.time()
        manual = evaluate_zero_shot(TrainConfig(model="gemma", task=task), split="test")["precision_at_1"]
        cfg = TrainConfig(model="gemma", task=task, method="p_tuning", epochs=args.probing_epochs, batch_size=16,
                          output_dir=str(runs / f"probe-{rel}"), overwrite=True, progress=False, seed=args.seed)
        summary = train(cfg)
        rows.append({"relation": task, "test_n": summary["examples"]["test"], "manual": manual,
                     "manual_template": MANUAL_PROMPTS[rel][1], "p_tuning": summary["test"]["precision_at_1"],
                     "best_validation": summary["best_validation_precision_at_1"], "train_s": summary[
                         "train_seconds_this_session"], "wall_s": time.time() - t0,
                     "trainable_percent": summary["trainable_percent"], "template": _template(summary)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _template(summary: dict) -> str:
    return json.loads((Path(summary["adapter"]) / "adapter_config.json").read_text())["template"]


def bbc_table(args: argparse.Namespace, runs: Path) -> list[dict]:
    from ptune.engine import Run, TrainConfig, train

    zs = Run.zero_shot(TrainConfig(model="gemma", task="bbc"))
    rows = [{"method": "manual prompt (zero-shot)", "test_accuracy": zs.evaluate("test")["accuracy"],
             "validation_accuracy": zs.evaluate("validation")["accuracy"], "trainable_percent": 0.0,
             "train_s": 0.0, "template": zs.model.template.source}]
    print(json.dumps(rows[-1]), flush=True)
    del zs
    for label, method, options, template in BBC_ROWS:
        cfg = TrainConfig(model="gemma", task="bbc", head="verbalizer", method=method, method_options=options,
                          template=template, epochs=args.bbc_epochs, limit_train=args.bbc_limit_train,
                          batch_size=8, output_dir=str(runs / f"bbc-{method}"), overwrite=True, progress=False,
                          seed=args.seed)
        summary = train(cfg)
        rows.append({"method": label, "test_accuracy": summary["test"]["accuracy"],
                     "validation_accuracy": summary["best_validation_accuracy"],
                     "trainable_percent": summary["trainable_percent"],
                     "train_s": summary["train_seconds_this_session"], "peak_rss_mb": summary["peak_rss_mb"],
                     "template": _template(summary)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(args: argparse.Namespace, probing: list[dict], bbc: list[dict]) -> str:
    lines = [f"Gemma 3 270M (bf16 folder converted from the packaged GGUF), frozen; {platform.machine()}, "
             f"CPU, seed {args.seed}. Command: `python bench/gemma_tables.py` "
             f"(probing epochs {args.probing_epochs}; bbc epochs {args.bbc_epochs}, "
             f"first {args.bbc_limit_train} training articles).", ""]
    if probing:
        lines += ["## Knowledge probing: precision@1 on held-out test subjects", "",
                  "| relation | test subjects | manual prompt | P-Tuning | P-Tuning best val | P-Tuning train s |",
                  "|---|---|---|---|---|---|"]
        for r in probing:
            lines.append(f"| {r['relation']} | {r['test_n']} | {r['manual']:.3f} | **{r['p_tuning']:.3f}** | "
                         f"{r['best_validation']:.3f} | {r['train_s']:.0f} |")
        lines += ["", "Manual prompts: " + "; ".join(f"`{r['relation']}`: `{r['manual_template']}`"
                                                    for r in probing),
                  f"P-Tuning: `{probing[0]['template']}`-style (10 virtual tokens from a bi-LSTM encoder before "
                  f"the manual prompt), {probing[0]['trainable_percent']:.2f}% of parameters.", ""]
    if bbc:
        lines += ["## bbc topic classification through a verbalizer (test accuracy, 225 articles)", "",
                  "| method | test acc | best val acc | trainable % | train s | template |", "|---|---|---|---|---|---|"]
        for r in bbc:
            tpl = r["template"].replace("\n", "\\n")
            lines.append(f"| {r['method']} | {r['test_accuracy']:.3f} | {r['validation_accuracy']:.3f} | "
                         f"{r['trainable_percent']:.3f} | {r['train_s']:.0f} | `{tpl}` |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tables", default="probing,bbc", help="probing, bbc or both (default)")
    parser.add_argument("--probing-epochs", type=float, default=6)
    parser.add_argument("--bbc-epochs", type=float, default=2)
    parser.add_argument("--bbc-limit-train", type=int, default=500)
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--runs", help="folder for the run directories (default: a temporary folder)")
    parser.add_argument("--out", help="write the Markdown tables here (and the rows as JSON beside it)")
    args = parser.parse_args()
    import transformers

    transformers.utils.logging.set_verbosity_error()
    tables = set(args.tables.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        probing = probing_table(args, runs) if "probing" in tables else []
        bbc = bbc_table(args, runs) if "bbc" in tables else []
    text = markdown(args, probing, bbc)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"probing": probing, "bbc": bbc}, indent=2))


if __name__ == "__main__":
    main()
