"""glibc malloc settings of a training process (``ptune.engine.memory.keep_freed_memory``): step time and page faults.

Each child builds ptune's Trainer for MiniLM / bbc (batch 32, max length 128, ``--precision auto``) and times
``--steps`` real training steps after 2 warm-up steps, with ptune's malloc settings (``keep``) or with
glibc's defaults (``default``: the Trainer's call is replaced by a no-op before it runs). Children alternate,
``--rounds`` times each, so machine load hits both alike; reported: the median step of each child, and its
minor page faults (``getrusage``), whole process.

    python bench/malloc.py                      # bench/results/malloc.{md,json}
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(mode: str, method: str, steps: int) -> dict:
    import resource
    import tempfile

    import ptune.engine.memory as memory

    if mode == "default":
        memory.keep_freed_memory = lambda: False
    from speed import step_trainer

    tr = step_trainer({"method": method, "task": "bbc", "batch_size": 32, "max_length": 128, "progress": False,
                       "method_options": {"layers": "all"} if method == "p_tuning_v2" else {},  # full depth
                       "output_dir": tempfile.mkdtemp(prefix="ptune-malloc-"), "overwrite": True})
    times = []
    try:
        for i in range(steps + 2):
            t0 = time.perf_counter()
            tr.train_step([list(range(32 * i, 32 * i + 32))])
            if i >= 2:
                times.append(time.perf_counter() - t0)
    finally:
        tr.directory.close()
    return {"mode": mode, "method": method, "median_step_s": statistics.median(times), "steps_s": times,
            "minor_page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt, "precision": tr.precision}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="p_tuning_v2,lora")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "malloc.md"))
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.one:
        job = json.loads(args.one)
        print("RESULT " + json.dumps(child(job["mode"], job["method"], args.steps)), flush=True)
        return
    from speed import describe, host_facts, load

    runs = []
    for method in args.methods.split(","):
        for _ in range(args.rounds):
            for mode in ("default", "keep"):
                before = load()
                out = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--one",
                                      json.dumps({"mode": mode, "method": method})], capture_output=True, text=True)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"a child failed: {out.stderr.strip().splitlines()[-1:]}")
                runs.append({**json.loads(line[7:]), "load_before": before, "load_after": load()})
                print(runs[-1]["method"], mode, round(runs[-1]["median_step_s"], 3), runs[-1]["minor_page_faults"])
    facts = host_facts()
    lines = [describe(facts), "", "| method | malloc | median s/step (each child) | median of children | "
             "minor page faults (each child) | default / keep |", "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in runs):
        med = {}
        for mode in ("default", "keep"):
            rs = [r for r in runs if r["method"] == method and r["mode"] == mode]
            med[mode] = statistics.median(r["median_step_s"] for r in rs)
            ratio = f"{med['default'] / med['keep']:.2f}x" if mode == "keep" else ""
            steps = ", ".join(format(r["median_step_s"], ".3f") for r in rs)
            faults = ", ".join(str(r["minor_page_faults"]) for r in rs)
            lines.append(f"| {method} | {mode} | {steps} | {med[mode]:.3f} | {faults} | {ratio} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"command": "python bench/malloc.py " + " ".join(sys.argv[1:]),
                                                    "host": facts, "runs": runs}, indent=2))
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
