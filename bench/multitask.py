"""Multi-task training, warm start and prompt ensembling on the packaged MiniLM (issue #12).

    python bench/multitask.py [--part all|multitask|warm|ensemble] [--out bench/results/multitask.json]

Every run is an ordinary `ptune.engine.train` run (P-Tuning v2, bf16 autocast where the CPU has it,
seed 13) in bench/runs/multitask/; the raw summaries go to the JSON file, a table to the .md beside it.

- multitask: bbc + wnut in one adapter (a prompt per task, a head per task) for S steps, against each
  task trained alone for the same S steps (the multi-task run sees about half as many rows of each).
- warm: P-Tuning v2 pre-trained on bbc + wnut with one shared prompt (P-Tuning v2's multi-task
  pre-training), then adapted to bbc for one epoch from that prompt (`--init-from --init-task bbc`),
  against one epoch from scratch: validation accuracy after the epoch and the first evaluation
  (every 8 steps) that reaches 95% accuracy.
- ensemble: K = 1, 3, 5 prompts for bbc trained in one run each on 200 training examples (few-shot),
  member and ensemble accuracy on the test split (3 epochs, 21 steps).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ptune.engine import TrainConfig, train

ROOT = Path("bench/runs/multitask")
COMMON = dict(model="minilm", method="p_tuning_v2", method_options={"num_virtual_tokens": 8, "layers": "all"}, batch_size=32, warmup_ratio=0.06,
              progress=False, overwrite=True, limit_eval=200, seed=13, lr=1e-2)


def run(name: str, **kw) -> dict:
    started = time.perf_counter()
    cfg = TrainConfig(**{**COMMON, "output_dir": str(ROOT / name), **kw})
    summary = train(cfg)
    summary["wall_seconds"] = time.perf_counter() - started
    print(f"{name}: {json.dumps(summary.get('test'))} ({summary['wall_seconds']:.0f} s)", flush=True)
    return summary


def validation_curve(name: str) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in open(ROOT / name / "metrics.jsonl")]
    return [(r["step"], r["accuracy"]) for r in rows if r.get("split") == "validation"]


def multitask(steps: int = 60) -> dict:
    return {"steps": steps,
            "bbc+wnut": run("mt_bbc_wnut", task="bbc,wnut", max_steps=steps),
            "bbc alone": run("bbc_alone", task="bbc", max_steps=steps),
            "wnut alone": run("wnut_alone", task="wnut", max_steps=steps)}


def warm(pretrain_steps: int = 40) -> dict:
    source = run("pretrain_shared", task="bbc,wnut", share_prompt=True, max_steps=pretrain_steps)
    out = {"pretrain": source}
    for name, extra in (("from scratch", {}),
                        ("warm start", {"init_from": str(ROOT / "pretrain_shared"), "init_task": "bbc"})):
        tag = "scratch" if not extra else "warm"
        summary = run(f"bbc_{tag}", task="bbc", epochs=1, eval_every=8, **extra)
        curve = validation_curve(f"bbc_{tag}")
        reach = next((step for step, acc in curve if acc >= 0.95), None)
        out[name] = {"summary": summary, "validation_curve": curve, "steps_to_95": reach,
                     "validation_after_1_epoch": curve[-1][1]}
    return out


def ensemble() -> dict:
    return {f"K={k}": run(f"ensemble_{k}", task="bbc", ensemble=k, limit_train=200, epochs=3, limit_eval=0)
            for k in (1, 3, 5)}


def table(results: dict) -> str:
    lines = ["# Multi-task, warm start, ensembles (MiniLM, P-Tuning v2, 8 virtual tokens)", "",
             "Command: `python bench/multitask.py`; raw results: `bench/results/multitask.json`.", ""]
    if "multitask" in results:
        m = results["multitask"]
        lines += [f"## Multi-task vs alone ({m['steps']} steps of 32 rows each)", "",
                  "| run | bbc test accuracy | wnut test entity F1 | train s |", "|---|---|---|---|"]
        mt = m["bbc+wnut"]
        lines.append(f"| bbc + wnut, one adapter | {mt['test']['bbc/accuracy']:.4f} | {mt['test']['wnut/f1']:.4f} | "
                     f"{mt['train_seconds_this_session']:.0f} |")
        lines.append(f"| bbc alone | {m['bbc alone']['test']['accuracy']:.4f} | | "
                     f"{m['bbc alone']['train_seconds_this_session']:.0f} |")
        lines.append(f"| wnut alone | | {m['wnut alone']['test']['f1']:.4f} | "
                     f"{m['wnut alone']['train_seconds_this_session']:.0f} |")
        lines.append("")
    if "warm" in results:
        w = results["warm"]
        lines += ["## Warm start on bbc (1 epoch, evaluation every 8 steps on 200 validation rows)", "",
                  "| start | validation accuracy after 1 epoch | first evaluation at >= 95% | test accuracy |",
                  "|---|---|---|---|"]
        for name in ("from scratch", "warm start"):
            r = w[name]
            lines.append(f"| {name} | {r['validation_after_1_epoch']:.4f} | step {r['steps_to_95']} | "
                         f"{r['summary']['test']['accuracy']:.4f} |")
        lines.append("")
    if "ensemble" in results:
        lines += ["## Prompt ensembles on bbc, 200 training examples, 3 epochs", "",
                  "| K | ensemble test accuracy | members' test accuracy | train s |", "|---|---|---|---|"]
        for k, r in results["ensemble"].items():
            members = [v for key, v in sorted(r["test"].items()) if key.startswith("member_")]
            shown = ", ".join(f"{v:.4f}" for v in members) or "(one prompt)"
            lines.append(f"| {k[2:]} | {r['test']['accuracy']:.4f} | {shown} | {r['train_seconds_this_session']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--part", default="all", choices=("all", "multitask", "warm", "ensemble"))
    p.add_argument("--out", default="bench/results/multitask.json")
    args = p.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for part, fn in (("multitask", multitask), ("warm", warm), ("ensemble", ensemble)):
        if args.part in ("all", part):
            results[part] = fn()
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
