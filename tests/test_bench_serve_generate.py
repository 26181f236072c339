"""Smoke test of bench/serve_generate.py's logic on a tiny random GPT-2 (the real run uses Gemma 3 270M):
both servers start, every request is answered, the batched answers equal the one-at-a-time ones, and the
numbers are written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="ptune serve needs the serve extra")


def test_bench_serve_generate_smoke(tiny_gpt2_dir, tmp_path):
    spec = importlib.util.spec_from_file_location("serve_generate", Path(__file__).parents[1] / "bench" / "serve_generate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    result = bench.main(["--base", tiny_gpt2_dir, "--requests", "8", "--clients", "4", "--new-tokens", "5",
                         "--out", str(out)])
    assert json.loads(out.read_text())["requests"] == 8
    for mode in ("batched", "one_at_a_time"):
        assert result[mode]["non_200"] == 0 and result[mode]["exit_code"] == 0, result[mode]
        assert result[mode]["new_tokens"] == 8 * 5 and result[mode]["ttft_p50_s"] is not None
    assert result["one_at_a_time"]["mean_rows_per_step"] == 1.0
    assert result["outputs_equal_alone"] == result["outputs_compared"] == 8, result["mismatches"]
