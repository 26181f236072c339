"""Studies: choose a method by evidence. Many ordinary runs -> one report with tables and plots.

- :func:`compare`: methods side by side over seeds (``ptune compare``);
- :func:`sweep`: one option over a list of values (``ptune sweep``);
- :func:`ablate`: P-Tuning with one part removed per variant (``ptune ablate``);
- :func:`ptune.studies.recommend.recommend`: a method and settings from measurements (``ptune recommend``).

Each (variant, seed) is a ``ptune train`` run in its own process under ``OUTPUT/runs/``; a study
run again continues where it stopped. The report (``report.md``, ``report.html``, ``results.json``,
PNG plots) is rewritten from the runs' own summaries and metric logs after every study.
"""

from __future__ import annotations

from . import recommend  # noqa: F401  (ptune.studies.recommend.choose_peft_method after import ptune)
from .api import ablate, compare, run, sweep
from .plan import ABLATIONS, Study
from .report import write_report

__all__ = ["ABLATIONS", "Study", "compare", "sweep", "ablate", "run", "write_report"]
