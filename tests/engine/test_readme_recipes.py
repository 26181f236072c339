"""The README's multi-task recipe runs as written, line by line, on the packaged MiniLM.

Each ``ptune`` line of the block marked ``<!-- multitask-recipe -->`` runs with its own arguments;
training lines get ``--max-steps 2`` and small data limits appended (the options a user would
shorten a trial with), evaluation lines ``--limit`` (tests/readme_blocks.py: SHORTEN). Later lines use
the runs earlier lines made, so the recipe is checked as a sequence: train, eval, predict, warm start,
ensemble, vote. The lines share one fresh interpreter (the package imports once).
"""

from __future__ import annotations

from readme_blocks import block, plan, run_lines


def test_multitask_recipe_runs_as_written(tmp_path):
    items = plan(block("multitask-recipe"), tmp_path, [])
    lines = [i["argv"] for i in items]
    assert [a[0] for a in lines] == ["train", "eval", "eval", "predict", "train", "train", "train", "predict",
                                     "train", "predict"]
    (tmp_path / "mixed.jsonl").write_text(block("mixed-jsonl").text)
    for args, r in zip(lines, run_lines(items, tmp_path)):
        if args[:2] == ["eval", "runs/mt"] and "--task" not in args:
            assert '"bbc/accuracy"' in r["stdout"] and '"wnut/f1"' in r["stdout"] and '"mean_score"' in r["stdout"]
        if "--init-from" in args:
            assert "warm start from runs/pre/best" in r["stdout"]
        if args[0] == "predict" and "--adapter" in args:  # one line per row: adapter, then its answer
            out = r["stdout"].splitlines()
            assert [x.split("\t")[0] for x in out] == ["bbc", "wnut", "bbc"]
            assert "/" in out[1]  # the tagging adapter answers token/tag pairs
        elif args[0] == "predict":
            assert r["stdout"].split("\t")[0] in ("business", "entertainment", "politics", "sports", "tech")
    assert (tmp_path / "runs" / "ens" / "best" / "adapter_config.json").is_file()
