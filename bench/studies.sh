#!/usr/bin/env bash
# The lab's tables on the packaged assets (MiniLM + bbc), each an ordinary ptune study:
#   6.1 analogue: five methods + P-Tuning v2 over 3 seeds; 6.2 analogue: P-Tuning's ablation over 3 seeds;
#   a prompt-length sweep 0..100 (P-Tuning v2: deep prompts take no input positions, so every length
#   sees the same text). 320 training articles, max length 64 (headline and first sentence), 2 epochs,
#   batch 16, evaluation every 10 steps: about an hour on a 2-core CPU. Re-running continues an interrupted study (finished runs are reused).
set -euo pipefail
cd "$(dirname "$0")/.."
COMMON=(--model minilm --task bbc --limit-train 320 --max-length 64 --epochs 2 --batch-size 16 --eval-every 10)
ptune compare --methods p_tuning,prompt_tuning,p_tuning_v2,lora,bitfit,full --seeds 3 "${COMMON[@]}" \
  --output-dir bench/studies/compare
ptune ablate --seeds 3 "${COMMON[@]}" --output-dir bench/studies/ablate
ptune sweep --method p_tuning_v2 --sweep num_virtual_tokens=0,1,5,10,20,50,100 --seeds 1 "${COMMON[@]}" \
  --output-dir bench/studies/sweep_num_virtual_tokens
# LoRA, BitFit and full fine-tuning trail far behind at their default learning rates in 40 steps: is it the rate?
ptune sweep --method lora --sweep lr=5e-4,2e-3,5e-3,1e-2 --seeds 1 "${COMMON[@]}" --output-dir bench/studies/sweep_lr_lora
ptune sweep --method full --sweep lr=3e-5,1e-4,3e-4 --seeds 1 "${COMMON[@]}" --output-dir bench/studies/sweep_lr_full
ptune sweep --method bitfit --sweep lr=1e-3,5e-3,2e-2 --seeds 1 "${COMMON[@]}" --output-dir bench/studies/sweep_lr_bitfit
# the same three at the rate their sweep's validation accuracy picked, over 3 seeds (seed 13's sweep chose them)
ptune compare --methods lora:lr=1e-2,bitfit:lr=5e-3,full:lr=3e-4 --seeds 3 "${COMMON[@]}" \
  --output-dir bench/studies/compare_tuned_lr
