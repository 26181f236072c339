"""Full-depth vs top-half P-Tuning v2 on bbc, 2 epochs: the table of bench/speed.sh's step 2 (issue #15).

Reads bench/runs/layers/<variant>/summary.json (made by the ``ptune train`` lines of bench/speed.sh) and
writes bench/results/layers.json (the summaries as they are) and bench/results/layers.md.

    python bench/layers_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VARIANTS = {"full": "every layer (default levers: pruned last layer)",
            "full-plain": "every layer, `--no-prune-last-layer` (the plain path)",
            "top3": "`--layers top:3` (cache + pruned last layer)",
            "top3-nocache": "`--layers top:3 --no-cache-frozen-layers`"}


def main() -> None:
    runs = {v: json.loads((ROOT / "runs" / "layers" / v / "summary.json").read_text()) for v in VARIANTS}
    plain = runs["full-plain"]["train_seconds_this_session"] - runs["full-plain"]["eval_seconds"]
    lines = ["| variant | best val acc | test acc | trainable | train s (without eval) | eval s | vs plain full depth | "
             "frozen-layer cache | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|"]
    for v, text in VARIANTS.items():
        s = runs[v]
        train = s["train_seconds_this_session"] - s["eval_seconds"]
        work = s.get("frozen_work") or {}
        cache = (f"{work['cached_batches']} of {work['cached_batches'] + work['computed_batches']} batches, "
                 f"{work['cache_mb']:.0f} MB" if work.get("cached_rows") else "-")
        lines.append(f"| {text} | {s['best_validation_accuracy']:.4f} | {s['test']['accuracy']:.4f} | "
                     f"{s['trainable_parameters']:,} | {train:.1f} | {s['eval_seconds']:.1f} | {plain / train:.2f}x | "
                     f"{cache} | {s['peak_rss_mb']:.0f} |")
    (ROOT / "results" / "layers.json").write_text(json.dumps(runs, indent=1))
    (ROOT / "results" / "layers.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
