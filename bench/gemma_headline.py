"""Gemma 3 270M on ``bbc-headline`` (issue #26 item 4): the hand-written prompt zero-shot against prompt
tuning, P-Tuning v2, LoRA and QLoRA-nf4 trained on one budget, each scored by what it generates.

Every row is fresh ``ptune`` processes, as a user runs them:

    ptune eval --zero-shot --model gemma --task bbc-headline --generate --limit N
    ptune train --model gemma --task bbc-headline --method M [flags] --limit-train T --epochs 1 --batch-size B
    ptune eval RUN --generate --limit N                       # the test split, greedy, ROUGE / BLEU-4

Training uses each method's defaults (learning rate, prompt length, layers, LoRA targets) unless a
variant's flags say otherwise; validation is the loss on the first ``--limit-eval`` validation articles,
once at the end of the epoch. The test rows are the first ``--limit`` test articles (never trained on:
``bbc-headline`` keeps ``bbc``'s splits).

    python bench/gemma_headline.py                      # the five rows (about 1.5 h on 2 CPU cores)
    python bench/gemma_headline.py --rows lora --limit-train 64 --limit 8     # a smoke run

Writes raw numbers to bench/results/gemma_headline.json (``--out``) and a table beside it (.md); the run
directories and logs go to ``--work-dir`` (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import describe, host_facts, load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

ROWS = {
    "zero-shot": None,
    "prompt_tuning": "--method prompt_tuning",
    "p_tuning_v2": "--method p_tuning_v2",
    "lora": "--method lora",
    "qlora-nf4": "--method lora --quantize nf4",
}
SCORES = ("rouge1", "rouge2", "rougeL", "bleu4", "loss")


def ptune(args: list[str], log: Path) -> tuple[int, float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    started = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.run([sys.executable, "-m", "ptune.cli", *args], stdout=fh, stderr=subprocess.STDOUT,
                            env=env).returncode
    if rc != 0:
        sys.stderr.write(f"ptune {' '.join(args)} exited {rc}; see {log}\n{log.read_text()[-2000:]}\n")
    return rc, round(time.perf_counter() - started, 1)


def per_article_rouge_l(preds: Path) -> tuple[list[str], list[float]]:
    """Each answered article's id and ROUGE-L F (``ptune.metrics.rouge_scores`` on the pair alone)."""
    from ptune.metrics import rouge_scores

    rows = [json.loads(x) for x in preds.read_text().splitlines() if x.strip()]
    return [r["id"] for r in rows], [rouge_scores([r["prediction"]], [r["reference"]])["rougeL"] for r in rows]


def paired_bootstrap(a: list[float], b: list[float], samples: int = 10000, seed: int = 0) -> dict:
    """Mean of a - b over the same articles, its 95% interval (resampling articles), and how many articles
    each side wins."""
    import random

    diffs = [x - y for x, y in zip(a, b)]
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(diffs, k=len(diffs))) / len(diffs) for _ in range(samples))
    return {"mean_difference": sum(diffs) / len(diffs), "ci95": [means[int(0.025 * samples)], means[int(0.975 * samples) - 1]],
            "better": sum(d > 0 for d in diffs), "worse": sum(d < 0 for d in diffs), "articles": len(diffs)}


def add_comparisons(result: dict) -> None:
    """Per trained row: its per-article ROUGE-L against zero-shot's on the same test articles."""
    rows = {r["row"]: r for r in result["rows"]}
    zero = rows.get("zero-shot")
    for r in result["rows"]:
        if r is zero or not zero or not r.get("rougeL_per_article") or not zero.get("rougeL_per_article"):
            continue
        if r["article_ids"] != zero["article_ids"]:
            raise SystemExit(f"{r['row']} answered other test articles than zero-shot; rerun both")
        r["rougeL_vs_zero_shot"] = paired_bootstrap(r["rougeL_per_article"], zero["rougeL_per_article"])


def rescore(work: Path, out: Path) -> None:
    """Per-article ROUGE-L from the predictions files a finished run left in ``--work-dir``, into its JSON."""
    result = json.loads(out.read_text())
    for r in result["rows"]:
        preds = work / f"{r['row']}-predictions.jsonl"
        if preds.exists():
            r["article_ids"], r["rougeL_per_article"] = per_article_rouge_l(preds)
    add_comparisons(result)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(table(result))


def generate_scores(head: list[str], limit: int, max_new_tokens: int, work: Path, name: str) -> dict:
    preds = work / f"{name}-predictions.jsonl"
    log = work / f"{name}-eval.log"
    rc, wall = ptune(["eval", *head, "--generate", "--limit", str(limit), "--split", "test",
                      "--max-new-tokens", str(max_new_tokens), "--output", str(preds)], log)
    text = log.read_text()
    scores = json.loads(text[text.index("{"):]) if rc == 0 else {}
    examples = [json.loads(x) for x in preds.read_text().splitlines()[:3]] if preds.exists() else []
    ids, per_article = per_article_rouge_l(preds) if rc == 0 else ([], [])
    return {"exit_code": rc, "wall_s": wall, **{k: scores.get(k) for k in (*SCORES, "generated")},
            "article_ids": ids, "rougeL_per_article": per_article, "examples": examples}


def run_row(name: str, flags: str | None, args, work: Path) -> dict:
    common = ["--model", "gemma", "--task", "bbc-headline"]
    if flags is None:
        return {"row": name, "flags": "", **generate_scores(["--zero-shot", *common], args.limit,
                                                           args.max_new_tokens, work, name)}
    out = work / name
    cmd = ["train", *common, *shlex.split(flags), *shlex.split(args.train_flags), "--limit-train",
           str(args.limit_train), "--limit-eval", str(args.limit_eval), "--epochs", "1", "--batch-size",
           str(args.batch_size), "--seed", str(args.seed), "--no-progress", "--output-dir", str(out)]
    before = load()[0]
    rc, wall = ptune(cmd, work / f"{name}-train.log")
    summary = json.loads((out / "summary.json").read_text()) if rc == 0 else {}
    row = {"row": name, "flags": " ".join([flags, args.train_flags]).strip(), "train_exit_code": rc,
           "train_wall_s": wall, "load_before": before,
           "steps": summary.get("steps"), "step_seconds": summary.get("step_seconds"),
           "peak_rss_mb": summary.get("peak_rss_mb"), "precision": summary.get("precision"),
           "trainable_parameters": summary.get("trainable_parameters"),
           "trainable_percent": summary.get("trainable_percent"),
           "validation_loss": summary.get("best_validation_loss")}
    if rc == 0:
        row.update(generate_scores([str(out)], args.limit, args.max_new_tokens, work, name))
    return row


def fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def versus(c: dict | None) -> str:
    if not c:
        return "-"
    return (f"{c['mean_difference']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}], "
            f"{c['better']} / {c['worse']} of {c['articles']}")


def trainable(row: dict) -> str:
    if row.get("trainable_parameters") is None:
        return "-"
    return f"{row['trainable_parameters']:,} ({row['trainable_percent']:.3f}%)"


def table(result: dict) -> str:
    a = result["args"]
    commands = result.get("commands") or [result["command"]]  # a table merged from several runs lists each
    lines = [*(f"`{c}`  " for c in commands), "",
             f"Gemma 3 270M, `bbc-headline`: {a['limit_train']} training articles, 1 epoch, batch {a['batch_size']}, "
             f"seed {a['seed']}; the first {a['limit']} test articles, greedy, at most {a['max_new_tokens']} new "
             f"tokens. {describe(result['host'])}" + (f" Note: {result['load_note']}." if result.get("load_note") else ""), "",
             "| row | flags | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-L - zero-shot [95% CI], articles better / worse | BLEU-4 "
             "| test loss | train s (steps) | peak RSS MB | trainable |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        trained = r.get("steps") is not None
        lines.append(
            f"| {r['row']} | `{r['flags']}` | {fmt(r.get('rouge1'))} | {fmt(r.get('rouge2'))} | {fmt(r.get('rougeL'))} "
            f"| {versus(r.get('rougeL_vs_zero_shot'))} | {fmt(r.get('bleu4'))} | {fmt(r.get('loss'))} "
            f"| {fmt(r.get('step_seconds'), 0) + ' (' + str(r['steps']) + ')' if trained else '-'} "
            f"| {fmt(r.get('peak_rss_mb'), 0) if trained else '-'} "
            f"| {trainable(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    p.add_argument("--limit-train", type=int, default=500)
    p.add_argument("--limit-eval", type=int, default=64, help="validation articles scored (loss) after the epoch")
    p.add_argument("--limit", type=int, default=100, help="test articles answered by generation")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--train-flags", default="", help="extra ptune train flags for every trained row")
    p.add_argument("--work-dir", default=None, help="keep run directories and logs here")
    p.add_argument("--out", default=str(RESULTS / "gemma_headline.json"))
    p.add_argument("--rescore", action="store_true",
                   help="only add per-article ROUGE-L and the paired comparison to --out, from the predictions "
                        "files a finished run left in --work-dir")
    args = p.parse_args()
    if args.rescore:
        if not args.work_dir:
            p.error("--rescore reads the predictions files of --work-dir; give the run's --work-dir")
        return rescore(Path(args.work_dir), Path(args.out))
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        p.error(f"unknown row(s) {unknown}; choose from {', '.join(ROWS)}")
    tmp = None if args.work_dir else tempfile.TemporaryDirectory(prefix="ptune-headline-")
    work = Path(args.work_dir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    result = {"command": "python " + " ".join(shlex.quote(x) for x in ["bench/gemma_headline.py", *sys.argv[1:]]),
              "host": host_facts(), "args": vars(args), "rows": []}
    out = Path(args.out)
    for name in rows:
        print(f"[{time.strftime('%H:%M:%S')}] {name}", flush=True)
        result["rows"].append(run_row(name, ROWS[name], args, work))
        add_comparisons(result)
        out.write_text(json.dumps(result, indent=1) + "\n")         # partial results survive an interruption
        out.with_suffix(".md").write_text(table(result))
        print(json.dumps({k: v for k, v in result["rows"][-1].items() if k != "examples"}), flush=True)
    print(table(result))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
