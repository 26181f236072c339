"""LAMA-style probing as multiple choice, against the verbalizer's first-token ranking (issue #16).

    python bench/multiple_choice.py [--relation capital] [--test-choices 10] [--train-choices 4]
                                    [--max-steps 15] [--out bench/results/multiple_choice.json]

Base: Gemma 3 270M (``gemma``), the one packaged base with an LM head (MiniLM has none, so a
verbalizer on it would read a random head). Facts, subjects and splits are the built-in probing task's
(``lama-<relation>``, GeoNames, split by subject 60/20/20, seed 13).

Each subject becomes a multiple-choice record: the relation's manual prompt as the question ("The
capital of France is") and a candidate list of its objects: the right one plus distractors drawn from
the relation's other objects with ``random.Random(f"{seed}-{subject}")`` (``--test-choices`` in all; 0
= every object of the relation, the full candidate list). Both scorers rank the same lists of the same
test subjects:

- multiple_choice_lm, zero-shot: the frozen LM's summed log-probability of every token of the candidate
  after the prompt (``Run.zero_shot`` on the multiple-choice task picks this head);
- verbalizer, zero-shot: the frozen LM's logit of each candidate's first token after the prompt (the
  probing tasks' scorer; candidates whose first tokens collide tie, ties go to the earlier candidate,
  and the share of lists with a tie at the top is reported);
- multiple_choice head: each "prompt + candidate" row is scored by a new linear layer on the last
  token's hidden state (LoRA r 8 on q/v + the layer, trained through ``ptune.engine.train`` on the
  train subjects with ``--train-choices`` candidates each, ``--max-steps`` steps of 4 records).

Raw results go to the JSON file, a table to the .md beside it. Runs live in bench/runs/multiple_choice/.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from ptune.data.probing import RELATIONS, load_probing
from ptune.engine import Run, TrainConfig, train
from ptune.heads import label_word_ids
from ptune.models import load_base, load_tokenizer
from ptune.templates import TemplateEncoder

ROOT = Path("bench/runs/multiple_choice")
SEED = 13


def question(relation: str, subject: str) -> str:
    return RELATIONS[relation][1].replace("{mask}", "").replace("{subject}", subject)


def records(relation: str, facts: list[dict], objects: list[str], k: int) -> list[dict]:
    out = []
    for f in facts:
        if k <= 0 or k >= len(objects):
            choices = list(objects)
        else:
            rng = random.Random(f"{SEED}-{f['subject']}")
            choices = [f["object"], *rng.sample([o for o in objects if o != f["object"]], k - 1)]
            rng.shuffle(choices)
        out.append({"question": question(relation, f["subject"]), "choices": choices,
                    "label": choices.index(f["object"])})
    return out


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@torch.no_grad()
def verbalizer_scores(relation: str, recs: list[dict]) -> dict:
    """First-token ranking of each record's choices by the frozen causal LM, zero-shot."""
    tok = load_tokenizer("gemma")
    lm = load_base("gemma", "causal_lm").eval()
    enc = TemplateEncoder("{question}{mask}", tok, causal=True)
    correct = ties = 0
    started = time.perf_counter()
    for r in recs:
        e = enc.encode({"question": r["question"]})
        logits = lm(input_ids=torch.tensor([e.input_ids])).logits[0, e.label_position].float()
        ids = label_word_ids(tok, r["choices"], causal=True)
        scores = logits[list(ids)]
        top = scores.max()
        ties += int((scores == top).sum() > 1)
        correct += int(int(scores.argmax()) == r["label"])
    return {"accuracy": correct / len(recs), "top_ties": ties, "seconds": time.perf_counter() - started}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--relation", default="capital", choices=sorted(RELATIONS))
    ap.add_argument("--test-choices", type=int, default=10, help="candidates per test subject; 0 = all objects")
    ap.add_argument("--train-choices", type=int, default=4)
    ap.add_argument("--max-steps", type=int, default=15)
    ap.add_argument("--out", default="bench/results/multiple_choice.json")
    ap.add_argument("--reuse", action="store_true", help="score an already trained run instead of training again")
    args = ap.parse_args()

    task, splits = load_probing(args.relation, seed=SEED)
    objects = list(task.labels)
    ROOT.mkdir(parents=True, exist_ok=True)
    data = {name: records(args.relation, splits[name], objects,
                          args.test_choices if name == "test" else args.train_choices) for name in splits}
    files = {name: write_jsonl(ROOT / f"{args.relation}_{name}.jsonl", rows) for name, rows in data.items()}
    task_file = ROOT / "task.yaml"
    task_file.write_text(f"name: lama-{args.relation}-mc\nhead: multiple_choice\ntext_fields: [question]\n"
                         "max_length: 32\n")
    chance = sum(1 / len(r["choices"]) for r in data["test"]) / len(data["test"])
    result: dict = {"relation": args.relation, "objects": len(objects),
                    "subjects": {k: len(v) for k, v in data.items()}, "test_choices": args.test_choices or len(objects),
                    "train_choices": args.train_choices, "chance": chance}
    print(json.dumps(result), flush=True)

    result["verbalizer_zero_shot"] = verbalizer_scores(args.relation, data["test"])
    print("verbalizer:", result["verbalizer_zero_shot"], flush=True)

    scored = time.perf_counter()  # zero-shot on a multiple-choice task: the multiple_choice_lm head
    zero = Run.zero_shot(TrainConfig(model="gemma", task=str(task_file), test_file=files["test"], progress=False))
    result["choice_logprob_zero_shot"] = {"head": zero.model.head_config.kind, "test": zero.evaluate("test"),
                                          "seconds": time.perf_counter() - scored}
    print("choice log-prob:", result["choice_logprob_zero_shot"], flush=True)
    del zero

    run_dir = ROOT / f"{args.relation}_lora"
    cfg = TrainConfig(model="gemma", task=str(task_file), train_file=files["train"],
                      validation_file=files["validation"], test_file=files["test"], method="lora",
                      method_options={"r": 8}, head="multiple_choice", max_steps=args.max_steps, batch_size=4,
                      eval_batch_size=16, lr=2e-3, warmup_ratio=0.0, eval_every=args.max_steps, limit_eval=16,
                      seed=SEED, progress=False, overwrite=True, output_dir=str(run_dir))
    if args.reuse and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    else:
        summary = train(cfg)
    run = Run(run_dir)
    scored = time.perf_counter()
    test = run.evaluate("test")  # every test subject (the run's own test line obeys limit_eval)
    result["multiple_choice_lora"] = {"test": test, "steps": summary["steps"],
                                      "trainable_percent": summary["trainable_percent"],
                                      "train_seconds": summary.get("train_seconds_this_session"),
                                      "test_seconds": time.perf_counter() - scored}
    result["predict_example"] = run.predict([data["test"][0]])[0]
    print("multiple choice:", result["multiple_choice_lora"], flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))


def table(r: dict) -> str:
    mc, vb, lp = r["multiple_choice_lora"], r["verbalizer_zero_shot"], r["choice_logprob_zero_shot"]
    return "\n".join([
        f"# lama-{r['relation']} as multiple choice (Gemma 3 270M)", "",
        "Command: `python bench/multiple_choice.py`; raw results: `bench/results/multiple_choice.json`.", "",
        f"{r['subjects']['test']} test subjects, {r['test_choices']} candidates each (the right object and seeded "
        f"distractors from the relation's {r['objects']} objects); chance {r['chance']:.3f}.", "",
        "| scorer | trained | test accuracy | notes |", "|---|---|---|---|",
        f"| verbalizer, first token, manual prompt | nothing | {vb['accuracy']:.3f} | "
        f"{vb['top_ties']} lists tie at the top (shared first tokens) |",
        f"| multiple_choice_lm: summed log-prob of all the candidate's tokens, manual prompt | nothing | "
        f"{lp['test']['accuracy']:.3f} | `ptune eval --zero-shot` on the multiple-choice task |",
        f"| multiple_choice head (linear on last token) + LoRA r 8 | {mc['steps']} steps x 4 subjects x "
        f"{r['train_choices']} candidates, {mc['train_seconds'] or 0:.0f} s | {mc['test']['accuracy']:.3f} | "
        f"{mc['trainable_percent']:.3f}% trainable |", "",
        "Seconds are wall time on a 2-core CPU shared with other jobs (load 5-8 while this ran): read them as "
        "an upper bound.", ""])


if __name__ == "__main__":
    main()
