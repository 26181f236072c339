"""Stage 2 of the lab: train P-Tuning on a frozen model.

    python examples/lab/2_train_p_tuning.py [--quick] [--output-dir runs/lab-p-tuning]
    python examples/lab/2_train_p_tuning.py --config examples/lab/sst2_bert_base.yaml   # online: BERT-base + SST-2

By default: the packaged MiniLM (frozen) on BBC News topics, P-Tuning with 10 pseudo tokens before
the article produced by an MLP prompt encoder, and a new classification head; two epochs (a few
minutes on a laptop CPU). --quick trains a few steps on a slice of the data (under a minute), enough
to see every stage work, not to learn the task. --config starts from a run YAML (any `ptune train`
option) instead; --quick and --output-dir still apply on top of it.

This is `ptune train` through the Python API (ptune.engine.train); the run directory it writes
(config.json, metrics.jsonl, best/, summary.json) is what stage 3 reads.
"""

from __future__ import annotations

import argparse
import sys

from ptune.engine import TrainConfig, train

LAB = dict(model="minilm", task="bbc", method="p_tuning",
           method_options={"num_virtual_tokens": 10, "encoder": "mlp", "encoder_num_layers": 2},
           epochs=2, batch_size=32, lr=1e-2, seed=13)
# fp32: at this batch size bf16 autocast on a CPU costs more in casts than it saves (measured: 11 s vs 17 s CPU time)
QUICK = dict(max_steps=4, batch_size=8, limit_train=32, limit_eval=24, eval_batch_size=24, max_length=64,
             log_every=1, precision="fp32")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps on a slice of the data (< 1 minute)")
    parser.add_argument("--config", help="a run YAML to start from instead of the lab's MiniLM + bbc setting")
    parser.add_argument("--output-dir", default=None, help="run directory (default: runs/lab-p-tuning, or the "
                        "config's output_dir)")
    args = parser.parse_args()
    overrides = {**(QUICK if args.quick else {}), "overwrite": True, "progress": not args.quick}
    if args.output_dir or not args.config:
        overrides["output_dir"] = args.output_dir or "runs/lab-p-tuning"
    cfg = TrainConfig.from_yaml(args.config, **overrides) if args.config else TrainConfig(**{**LAB, **overrides})
    print(f"training {cfg.method} on {cfg.model} + {cfg.task} -> {cfg.output_dir}"
          + (" (quick: a few steps, not a real result)" if args.quick else ""), flush=True)
    s = train(cfg)
    metric = next(k for k in s if k.startswith("best_validation_"))
    test = s["test"] or {}
    rows = [("trainable parameters", f"{s['trainable_parameters']:,} of {s['total_parameters']:,} "
                                     f"({s['trainable_percent']:.3f}%)"),
            ("steps", f"{s['steps']} ({s['examples']['train']:,} training examples)"),
            ("training time", f"{s['train_seconds_this_session']:.1f} s"),
            (metric.replace("_", " "), f"{s[metric]:.4f} (step {s['best_step']})"),
            ("test accuracy", f"{test['accuracy']:.4f}" if "accuracy" in test else "no test split"),
            ("adapter", s["adapter"])]
    for name, value in rows:
        print(f"{name:<26}{value}")
    print(f"next: python examples/lab/3_inference_compare.py {s['run_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
