"""Shared fixtures: tiny random models of each architecture, built from configs (no downloads).

They reuse the packaged MiniLM WordPiece tokenizer (30,522 ids) so every architecture shares one
vocabulary; the models are random, so only mechanics are tested here, never quality.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from cases import ARCH_CASES, ARCHS, DECODERS, VOCAB  # noqa: E402, F401  (the one registry of test cases)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (the default, pyproject.toml): one worker per core, at most 4 (each imports torch and holds
    its tiny models; more workers on a big machine only add start-up and memory)."""
    return max(1, min(os.cpu_count() or 1, 4))


def pytest_addoption(parser):
    parser.addoption("--record-durations", metavar="FILE", default=None,
                     help="write every test's setup + call + teardown seconds, slowest first, to FILE "
                          "(tests/durations.txt is the committed list, so a regression shows in its diff)")


_DURATIONS: dict[str, float] = {}


def pytest_runtest_logreport(report):  # on the controller too, under xdist
    _DURATIONS[report.nodeid] = _DURATIONS.get(report.nodeid, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--record-durations")
    if not path or hasattr(session.config, "workerinput"):  # written once, by the controller
        return
    rows = sorted(_DURATIONS.items(), key=lambda kv: -kv[1])
    total = sum(_DURATIONS.values())
    with open(path, "w") as f:
        f.write(f"# seconds per test (setup + call + teardown), slowest first; {len(rows)} tests, "
                f"{total:.0f} s summed over workers; exit status {int(exitstatus)}\n")
        f.write("# python -m pytest -q --record-durations tests/durations.txt\n")
        for nodeid, seconds in rows:
            f.write(f"{seconds:8.2f}  {nodeid}\n")


@pytest.fixture(autouse=True)
def _own_working_dir(tmp_path, monkeypatch):
    """Each test runs in its own empty folder: defaults such as ``runs/default`` never meet (or write
    into) the checkout, where a user may just have run ``ptune train``."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine it costs ~3x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_config(arch: str):
    """The tiny random architecture's transformers config (tests/cases.py ARCH_CASES holds the builders)."""
    if arch not in ARCH_CASES:
        raise ValueError(arch)
    return ARCH_CASES[arch].config()


def liven(base, gain: float = 8.0):
    """Scale the random weight matrices up (std 0.02 -> 0.16) so attention is not uniform and a prompt
    can move the output within a few steps; the tiny models are random either way."""
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() >= 2:
                p.mul_(gain)
    return base


def train_steps(model, batch, steps: int = 5, lr: float = 1e-2, bf16: bool = False) -> list[float]:
    """A few AdamW steps (no weight decay: only gradients move weights); returns the losses, leaves eval mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


def tiny_base(arch: str, kind: str = "backbone", seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch)
    if kind == "backbone":
        model = tf.AutoModel.from_config(cfg)
    elif kind == "masked_lm":
        model = tf.AutoModelForMaskedLM.from_config(cfg)
    elif kind == "causal_lm":
        model = tf.AutoModelForCausalLM.from_config(cfg)
    else:
        raise ValueError(kind)
    model.config._ptune_source = ARCH_CASES[arch].source or f"tiny-{arch}"
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer():
    from ptune.models import load_tokenizer

    return load_tokenizer("minilm")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random BERT saved as a model folder (config, weights, MiniLM tokenizer)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_base("bert").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-gpt2")
    tiny_base("gpt2", "causal_lm").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


SPORT = ["the team won the match", "a late goal decided the cup final", "the striker scored twice",
         "the coach praised his players", "fans cheered the winning runner", "the league title race tightens"]
FOOD = ["simmer the sauce for ten minutes", "bake the bread until golden", "chop the onions finely",
        "season the soup with salt", "whisk the eggs and sugar", "roast the vegetables in the oven"]


@pytest.fixture()
def toy_task(tmp_path):
    """A two-class YAML task with CSV train/validation/test files in tmp_path."""
    import csv

    def write(name, rows):
        with open(tmp_path / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows(rows)
        return str(tmp_path / name)

    rows = [(t, "sport") for t in SPORT] + [(t, "food") for t in FOOD]
    files = {"train": write("train.csv", rows * 3), "validation": write("validation.csv", rows),
             "test": write("test.csv", rows)}
    (tmp_path / "task.yaml").write_text(
        "name: toy\ntask_type: classification\nlabels: [sport, food]\n"
        "label_words: {sport: sports, food: food}\nmax_length: 32\n")
    return {"task": str(tmp_path / "task.yaml"), **{f"{k}_file": v for k, v in files.items()}}
