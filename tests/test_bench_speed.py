"""The speed benchmarks' own arithmetic (issue #15): option pass-through and FLOP counting.

bench/mfu.py divides FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` by a step's time. The
counter has no formula for CPU SDPA (it counts it as 0), so mfu.py adds one; these tests pin that the
attention is counted and that a real MiniLM step's count matches the arithmetic of its matmuls.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import compare_peft  # noqa: E402
import mfu  # noqa: E402
from speed import parse_options  # noqa: E402


def test_options_json_and_key_value_with_yaml_values():
    got = parse_options(['{"target_modules": ["query"]}', "layers=top:3", "max_steps=2", "cache_frozen_layers=false"],
                        "--x")
    assert got == {"target_modules": ["query"], "layers": "top:3", "max_steps": 2, "cache_frozen_layers": False}


@pytest.mark.parametrize("item", ["nope", "=3", '{"a": 1', "[1, 2]"])
def test_bad_option_is_one_line_naming_it(item):
    with pytest.raises(ValueError, match="--x") as e:
        parse_options([item], "--x")
    assert "\n" not in str(e.value)


def test_ptune_options_split_into_train_and_method_options():
    train, method = compare_peft.split_ptune_options({"precision": "fp32", "max_steps": 3, "layers": "top:3", "r": 4})
    assert train == {"precision": "fp32", "max_steps": 3}
    assert method == {"layers": "top:3", "r": 4}


def test_cpu_sdpa_is_counted_with_torch_formulas():
    b, h, s, d = 2, 4, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False, custom_mapping=mfu.cpu_sdpa_mapping()) as counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()
    # forward: QK^T and PV (2 bmm); backward: recomputed QK^T, dP, dV, dQ, dK (5 bmm); 2 FLOPs a multiply-add
    assert counter.get_total_flops() == 7 * 2 * b * h * s * s * d


@pytest.mark.slow
def test_minilm_step_flops_match_its_matmuls():
    """A plain P-Tuning v2 step on the real MiniLM: frozen weights get no weight gradient, so forward +
    input-gradient matmuls are 2 x 2 x (weights in the layers) x tokens, plus attention and the head."""
    B, T = 2, 16
    job = {"model": "minilm", "method": "p_tuning_v2", "batch_size": B, "max_length": T, "warmup": 0, "steps": 1,
           "reuse_batches": False, "roof_size": 512, "threads": 0, "seed": 13, "method_options": {},
           "train_options": {"prune_last_layer": False, "cache_frozen_layers": False}, "limit_train": 16}
    r = mfu.run_one(job)
    assert r["batch_shape"] == [B, T]
    layer_weights = 4 * 384 * 384 + 2 * 384 * 1536  # q, k, v, o; feed-forward in and out
    matmuls = 2 * 2 * 6 * layer_weights * B * T
    assert matmuls <= r["flops"] <= 1.15 * matmuls
    assert r["useful_flops"] == r["flops"]  # nothing skipped: the plain step is this step
    assert r["seconds_per_step"] > 0 and 0 < r["mfu"] < 1.5


def test_peft_rows_are_ptune_rows_without_the_virtual_places():
    """compare_peft_gemma gives PEFT the ptune side's own tokens (PEFT prepends its prompt): ptune's layout puts
    the virtual tokens after <bos>, so taking them out must leave <bos>, the text, the labels, the padding."""
    import compare_peft_gemma

    P = 3
    ids = torch.tensor([[2, 0, 0, 0, 11, 12, 13, 1], [2, 0, 0, 0, 21, 22, 1, 0]])
    vidx = torch.tensor([[-1, 0, 1, 2, -1, -1, -1, -1], [-1, 0, 1, 2, -1, -1, -1, -1]])
    mask = torch.tensor([[1] * 8, [1] * 7 + [0]])
    labels = torch.tensor([[-100] * 5 + [12, 13, 1], [-100] * 5 + [22, 1, -100]])
    got = compare_peft_gemma.without_virtual_tokens({"input_ids": ids, "virtual_index": vidx, "attention_mask": mask,
                                                     "labels": labels})
    assert got["input_ids"].tolist() == [[2, 11, 12, 13, 1], [2, 21, 22, 1, 0]]
    assert got["attention_mask"].tolist() == [[1] * 5, [1] * 4 + [0]]
    assert got["labels"].tolist() == [[-100, -100, 12, 13, 1], [-100, -100, 22, 1, -100]]
    assert got["input_ids"].shape[1] == ids.shape[1] - P


def test_headline_paired_bootstrap_against_zero_shot():
    """bench/gemma_headline.py's comparison: the mean per-article difference, its resampled interval, wins."""
    import gemma_headline

    c = gemma_headline.paired_bootstrap([0.5, 0.5, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25], samples=200)
    assert c["mean_difference"] == 0.25 and c["ci95"] == [0.25, 0.25] and (c["better"], c["worse"]) == (4, 0)
    c = gemma_headline.paired_bootstrap([1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.5, 0.25], samples=2000)
    assert c["mean_difference"] == pytest.approx(0.0625) and (c["better"], c["worse"], c["articles"]) == (2, 1, 4)
    assert -1.0 <= c["ci95"][0] < 0.0625 < c["ci95"][1] <= 1.0
    result = {"rows": [{"row": "zero-shot", "article_ids": ["a", "b"], "rougeL_per_article": [0.1, 0.2]},
                       {"row": "lora", "article_ids": ["b", "a"], "rougeL_per_article": [0.3, 0.4]}]}
    with pytest.raises(SystemExit, match="other test articles"):
        gemma_headline.add_comparisons(result)
