"""Stage 3 of the lab: use the trained adapter, and compare it with the frozen base without prompts.

    python examples/lab/3_inference_compare.py RUN_DIR [--split test] [--quick]

Loads the run (its best adapter, rebuilt from the spec saved with it), scores a split with the
adapter, then scores it again inside ``model.disable_adapter()``: the same frozen base and the same
trained head, with the prompt encoder's vectors taken out (the prompt positions keep the padding
token's plain embedding). The gap is what the trained prompts add. It also labels a few
articles both ways. --quick scores the first 24 records only.
"""

from __future__ import annotations

import argparse
import sys

from ptune.engine import Run

EXAMPLES = ["Shares in the carmaker rose after it reported record quarterly profits.",
            "The striker scored twice as the champions won the cup final.",
            "The new smartphone has a faster chip and a longer-lasting battery."]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="the --output-dir of stage 2")
    parser.add_argument("--split", default="test", help="the split to score (default: test)")
    parser.add_argument("--quick", action="store_true", help="score the first 24 records only")
    args = parser.parse_args()
    run = Run(args.run_dir)
    limit = 24 if args.quick else 0
    metric = run.task.metric
    tuned = run.evaluate(args.split, limit=limit)
    with run.model.disable_adapter():
        base = run.evaluate(args.split, limit=limit)
    n = min(limit, len(run.splits[args.split])) if limit else len(run.splits[args.split])
    print(f"{run.model.spec.method_config.method} on {run.model.spec.base.name}, task {run.task.name}: "
          f"{args.split} split, {n} records")
    print(f"{'model':<40}{metric:>10}")
    print(f"{'trained adapter (prompts + head)':<40}{tuned[metric]:>10.4f}")
    print(f"{'frozen base without prompts (same head)':<40}{base[metric]:>10.4f}")
    print(f"{'gain from the prompts':<40}{tuned[metric] - base[metric]:>+10.4f}")
    if run.task.name == "bbc":
        with_prompts = run.predict(EXAMPLES)
        with run.model.disable_adapter():
            without = run.predict(EXAMPLES)
        for text, a, b in zip(EXAMPLES, with_prompts, without):
            print(f"{a['label']:>14} | {b['label']:<14} {text}")
        print("(left: with the prompts; right: without)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
