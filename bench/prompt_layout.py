"""Prompt layouts on bbc: each run's accuracy (from its summary.json) and how exactly its PEFT export reproduces it.

    python bench/prompt_layout.py RUN [RUN ...] --output bench/results/prompt_layout.json [--records 200]

For every finished run: ``ptune export RUN --format peft`` (its report: exact, the largest logit difference on
the probe texts), then the PEFT client (``AutoPeftModelForSequenceClassification`` for a SEQ_CLS export, else
``PeftModel`` over ``AutoModel`` with ``ptune_head.safetensors`` applied as the report says) on the first
``--records`` test records, fed each record's real tokens as ptune encoded them (``[CLS] text [SEP]``, what
``tokenizer(text, truncation=True)`` gives a PEFT user), against ptune's own logits (fp32).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch


def measure(run_dir: Path, records: int) -> dict:
    import peft
    import transformers as tf

    from ptune.batching import collate
    from ptune.engine import Run
    from ptune.engine.build import encode_records
    from ptune.export import export

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = export(run_dir, run_dir / "export-peft", "peft", overwrite=True)
    summary = json.loads((run_dir / "summary.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    run = Run(run_dir)
    rows = run.splits["test"][:records]
    examples = encode_records(run.task, run.encoder, rows)
    out = run_dir / "export-peft"
    cfg = peft.PeftConfig.from_pretrained(str(out))
    if cfg.task_type == "SEQ_CLS":
        client = peft.AutoPeftModelForSequenceClassification.from_pretrained(
            str(out), num_labels=run.model.head_config.num_labels).eval()
    else:
        client = peft.PeftModel.from_pretrained(tf.AutoModel.from_pretrained(cfg.base_model_name_or_path), str(out)).eval()
    ours, theirs = [], []
    with torch.no_grad():
        for start in range(0, len(examples), 16):
            enc = [e.encoded for e in examples[start:start + 16]]
            batch = collate(enc, pad_id=run.encoder.placeholder_id)
            ours.append(run.model(**batch).logits.float())
            real = [[t for t, v in zip(e.input_ids, e.virtual_index) if v < 0] for e in enc]
            T = max(map(len, real))
            ids = torch.tensor([r + [0] * (T - len(r)) for r in real])
            mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in real])
            got = client(input_ids=ids, attention_mask=mask)
            if cfg.task_type == "SEQ_CLS":
                theirs.append(got.logits.float())
            else:  # the body's hidden states (after PEFT's prompts) through ptune's head file, as the report says
                hidden = got.last_hidden_state[:, cfg.num_virtual_tokens:]
                theirs.append(run.model.head(hidden, {"attention_mask": mask}).float())
    ours, theirs = torch.cat(ours), torch.cat(theirs)
    return {
        "run": str(run_dir), "method": run.model.method,
        "prompt_layout": getattr(run.model.method_config, "prompt_layout", None),
        "pooling": config.get("pooling"), "template": run.model.template.source,
        "max_steps": config.get("max_steps"), "seed": config.get("seed"), "lr": summary.get("lr", config.get("lr")),
        "best_validation_accuracy": summary.get("best_validation_accuracy"), "test": summary.get("test"),
        "train_seconds": summary.get("train_seconds_this_session"),
        "export": {"exact": result.exact, "task_type": cfg.task_type, "probe_max_abs_diff": result.max_abs_diff,
                   "differences": result.differences, "warned": [str(w.message) for w in caught
                                                                 if "not exact" in str(w.message)]},
        "client_on_test": {"records": len(rows), "max_abs_diff": float((ours - theirs).abs().max()),
                           "same_label": int((ours.argmax(-1) == theirs.argmax(-1)).sum())},
        "summary": summary,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+")
    p.add_argument("--output", required=True)
    p.add_argument("--records", type=int, default=200)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    results = [measure(Path(r), args.records) for r in args.runs]
    Path(args.output).write_text(json.dumps(results, indent=2, default=str))
    for r in results:
        print(json.dumps({k: r[k] for k in ("run", "prompt_layout", "pooling", "test", "client_on_test")}, default=str))
        print("  export exact:", r["export"]["exact"], "probe diff:", r["export"]["probe_max_abs_diff"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
