"""``ptune compare | sweep | ablate | recommend``: argument parsing only (the work is in ptune.studies)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ..options import add_train_options, train_values
from .api import ablate, compare, sweep
from .plan import ABLATIONS
from .recommend import add_parser as add_recommend_parser

DEFAULT_METHODS = "p_tuning,prompt_tuning,p_tuning_v2,lora,bitfit,full"
# a study sets these itself for every run
NOT_STUDY_OPTIONS = ("method", "output_dir", "resume", "overwrite", "allow_changes", "progress")


def _say(line: str) -> None:
    print(line, flush=True)


def _study_parser(sub: Any, name: str, help: str, description: str, default_dir: str,
                  seeds: int, keep_method: bool, shown: Sequence[str] | None) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=description)
    p.add_argument("--output-dir", dest="study_dir", default=default_dir,
                   help=f"study folder: runs/, report.md, report.html, results.json, plots (default {default_dir}); "
                        "the same command again continues an interrupted study")
    p.add_argument("--seeds", dest="seeds", default=seeds, type=lambda v: int(v) if v.isdigit() else v,
                   help=f"how many seeds (from --seed), or a list: 13,21,42 (default {seeds})")
    exclude = NOT_STUDY_OPTIONS if not keep_method else tuple(o for o in NOT_STUDY_OPTIONS if o != "method")
    add_train_options(p, exclude=exclude, shown=shown)
    return p


def add_study_parsers(sub: Any, shown: Sequence[str] | None = None) -> None:
    """The study commands; ``shown``: the methods whose option groups the help shows (default all)."""
    c = _study_parser(sub, "compare", "train several methods over seeds; one report (tables, plots)",
                      "Train each method over seeds, every run an ordinary ptune train run, then write report.md "
                      "and report.html: mean ± std of the validation and test metric, trainable parameters and "
                      "share, adapter size, training time, samples/s, peak RSS, epochs and seconds of training to 95% of the best, and "
                      "plots (learning curves, score against trainable parameters and against time).",
                      "runs/compare", 3, keep_method=False, shown=shown)
    c.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma-separated (default {DEFAULT_METHODS})")
    c.set_defaults(func=_compare)
    s = _study_parser(sub, "sweep", "train one option over a list of values; report with a metric-vs-value plot",
                      "Train one run per value of one option (a training option such as lr, or an option of "
                      "the method such as num_virtual_tokens; num_virtual_tokens=0 is the frozen base and head "
                      "alone) over seeds, then write the report.", "runs/sweep", 1, keep_method=True, shown=shown)
    s.add_argument("--sweep", required=True, metavar="OPTION=V1,V2,...",
                   help="e.g. num_virtual_tokens=0,1,5,10,20,50,100 or encoder=none,mlp,lstm (with --method p_tuning)")
    s.set_defaults(func=_sweep)
    a = _study_parser(sub, "ablate", "P-Tuning's ablation: the full model and each part removed, over seeds",
                      "P-Tuning with one part removed per variant (" + "; ".join(
                          f"{k}: {v[0]}" for k, v in ABLATIONS.items()) + "), each over seeds; the report gives "
                      "each variant's score and its drop from the full model.", "runs/ablate", 3, keep_method=False, shown=shown)
    a.add_argument("--variants", help=f"a subset of {','.join(ABLATIONS)} (default all)")
    a.set_defaults(func=_ablate)
    add_recommend_parser(sub, shown)


def _values(args: argparse.Namespace) -> dict[str, Any]:
    return train_values(args, skip=("study_dir", "seeds", "methods", "sweep", "variants"))


def _finish(data: dict[str, Any], study_dir: str) -> int:
    report = Path(study_dir) / "report.md"
    table = [line for line in report.read_text().splitlines() if line.startswith("|")]
    end = next((k for k, line in enumerate(table) if line.startswith("| variant | seed |")), len(table))
    print("\n".join(table[:end]))
    print(f"ptune: report: {report}, {Path(study_dir) / 'report.html'} ({data['runs_finished']} of "
          f"{data['runs_expected']} runs; {data['ran']} trained now, {data['reused']} reused)")
    if data["failed"]:
        print(f"ptune: error: {len(data['failed'])} runs failed ({', '.join(f['variant'] + ' seed ' + str(f['seed']) for f in data['failed'])}); "
              "their logs are named in the report; fix the cause and run the same command again", file=sys.stderr)
        return 1
    return 0


def _compare(args: argparse.Namespace) -> int:
    return _finish(compare(args.methods, args.study_dir, seeds=args.seeds, log=_say, **_values(args)), args.study_dir)


def _sweep(args: argparse.Namespace) -> int:
    return _finish(sweep(args.sweep, args.study_dir, seeds=args.seeds, log=_say, **_values(args)), args.study_dir)


def _ablate(args: argparse.Namespace) -> int:
    return _finish(ablate(args.study_dir, seeds=args.seeds, variants=args.variants, log=_say, **_values(args)),
                   args.study_dir)
