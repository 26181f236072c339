"""Generation speed and memory on the packaged Gemma 3 270M: the plain base (HF ``generate``, the
reference) against ptune models carrying each kind of adapter.

One process loads the bf16 base once; each row attaches an adapter (prompt tuning, P-Tuning,
P-Tuning v2 deep prompts, LoRA), generates ``--new-tokens`` tokens greedily (KV cache on, the count
forced with ``min_new_tokens``) for ``--batch-size`` prompts, and reports the best of ``--repeats``
timings as new tokens per second, plus the process RSS peak while generating. Adapters are untrained
(their speed does not depend on their values). The "vs base" column is the adapter's overhead.

    python bench/gemma_generation.py --out bench/results_gemma_generation.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gemma_memory import RssSampler  # noqa: E402

PROMPTS = ["The capital of France is", "Water boils at", "The best way to learn a language is",
           "In 1969, the first people to walk on the Moon"]
ADAPTERS = {
    "prompt_tuning": {"num_virtual_tokens": 20},
    "p_tuning": {"num_virtual_tokens": 20},
    "p_tuning_v2": {"num_virtual_tokens": 20, "layers": "all"},
    "lora": {"r": 8},
}


def timed(fn, repeats: int) -> tuple[float, float]:
    """(best seconds, RSS peak in MB) over ``repeats`` calls."""
    sampler = RssSampler()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best, sampler.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1, choices=range(1, len(PROMPTS) + 1))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="write the Markdown table here")
    args = p.parse_args()
    import torch
    import transformers

    import ptune
    from ptune.batching import collate

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    tok = ptune.load_tokenizer("gemma")
    base = ptune.load_base("gemma", "causal_lm", dtype=torch.bfloat16)
    prompts = PROMPTS[:args.batch_size]
    options = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                   pad_token_id=tok.pad_token_id)
    tok.padding_side = "left"
    plain = tok(prompts, return_tensors="pt", padding=True)
    secs, rss = timed(lambda: base.generate(**plain, **options), args.repeats)
    rows = [("base (HF generate)", secs, rss, 0)]
    reference = secs
    print(rows[-1], flush=True)
    for method, values in ADAPTERS.items():
        model = ptune.apply(base, ptune.make_config(method, **values), head=ptune.HeadConfig("causal_lm"),
                            template="{text}", tokenizer=tok)
        model.eval()
        enc = ptune.TemplateEncoder(model.template, tok, max_length=64, causal=True)
        batch = collate([enc.encode({"text": t}) for t in prompts], pad_id=tok.pad_token_id, left=True)
        run = lambda: model.generate(batch["input_ids"], batch["attention_mask"], batch["virtual_index"],  # noqa: E731
                                     **options)
        secs, rss = timed(run, args.repeats)
        rows.append((method, secs, rss, model.trainable_parameters()[0]))
        print(rows[-1], flush=True)
        if method == "lora":  # LoRA wraps the base's layers in place; nothing follows it
            break
    new = args.new_tokens * args.batch_size
    lines = [f"Gemma 3 270M bf16, greedy generation of {args.new_tokens} new tokens for {args.batch_size} "
             f"prompt(s), KV cache, best of {args.repeats}; {torch.get_num_threads()} CPU threads. "
             "Command: `python bench/gemma_generation.py`.", "",
             "| model | new tokens/s | s per call | vs base | RSS peak while generating MB | adapter params |",
             "|---|---|---|---|---|---|"]
    for name, secs, rss, n in rows:
        lines.append(f"| {name} | {new / secs:.1f} | {secs:.2f} | {reference / secs:.2f}x | {rss:.0f} | {n:,} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
