#!/usr/bin/env bash
# Issue #15's speed figures, one after another on a quiet machine (~75 min on 2 cores). Each writes its
# raw results under bench/results/ (and bench/runs/ for the CLI runs); BENCHMARKS.md quotes them.
# (An earlier session's run on an Intel Xeon without BF16 is kept in bench/results/xeon-fp32/.)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate

# 0. the attention kernels at the benchmark's shapes (SDPA fp32 / bf16, eager bf16, ptune's matmul kernel)
python bench/attention.py

# 0b. glibc malloc settings of the training process (ptune keeps freed pages: fewer page faults per step)
python bench/malloc.py

# 1. ptune vs PEFT as its examples run vs PEFT tuned (base dropout off, bf16 only where native) vs PEFT tuned
#    with eager attention, 5 methods
python bench/compare_peft.py --limit-train 800 --epochs 1

# 2. full-depth vs top-half P-Tuning v2 on bbc, 2 epochs: accuracy and time, with and without the levers
for v in "full:" "full-plain:--no-prune-last-layer" "top3:--layers top:3" "top3-nocache:--layers top:3 --no-cache-frozen-layers"; do
  name=${v%%:*}; flags=${v#*:}
  ptune train --method p_tuning_v2 --epochs 2 --no-progress --overwrite --output-dir bench/runs/layers/$name $flags
done
python bench/layers_table.py

# 3. model FLOP utilisation of one training step (counted FLOPs vs a measured matmul roof)
python bench/mfu.py
python bench/mfu.py --models minilm --method-options layers=top:3 --reuse-batches --out bench/results/mfu_top3.md

# 4. training-time scaling with max length and threads
python bench/scaling.py

# 5. inference throughput vs a transformers pipeline
python bench/inference.py

# 6. torch.compile on the training step
python bench/compile.py --steps 4

# 7. the ptune side again with the methods in the upper half of the layers (P-Tuning v2, LoRA): one epoch,
#    so only the stopped backward pass and the pruned last layer count (the cache pays from epoch 2: step 2)
python bench/compare_peft.py --methods p_tuning_v2,lora --sides ptune --ptune-options layers=top:3 \
    --limit-train 800 --epochs 1 --out bench/results/compare_peft_top3.md
