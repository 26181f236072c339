"""Stage 1 of the lab: check the environment before training.

    python examples/lab/1_setup_check.py [--quick]

Prints one row per check (Python, torch, transformers, datasets, accelerate, ptune; the packaged
MiniLM model and BBC News data; CPU threads; bf16; GPU) and exits with status 1 and a one-line
message naming what is missing and how to get it. Without --quick it also times one training step
of MiniLM on a batch of BBC articles, so you know what stage 2 will cost on this machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys
import time

MIN_PYTHON = (3, 10)


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"{package} is not installed: run ./install.sh (or pip install -e .) in the repository")


def check_python() -> str:
    if sys.version_info < MIN_PYTHON:
        raise RuntimeError(f"Python {platform.python_version()} is too old: ptune needs >= 3.10")
    return platform.python_version()


def check_minilm() -> str:
    import ptune

    base = ptune.load_base("minilm")
    tok = ptune.load_tokenizer("minilm")
    params = sum(p.numel() for p in base.parameters())
    return f"{type(base).__name__}, {params / 1e6:.1f}M parameters, vocab {len(tok):,}"


def check_bbc() -> str:
    from ptune.data import load_builtin

    task, splits = load_builtin("bbc")
    sizes = " / ".join(f"{len(v):,}" for v in splits.values())
    return f"{len(task.labels)} classes, train / validation / test {sizes}"


def check_threads() -> str:
    import torch

    return f"torch uses {torch.get_num_threads()} of {os.cpu_count()} CPUs"


def check_bf16() -> str:
    from ptune.engine.precision import bf16_available

    return "yes (training autocasts to bf16)" if bf16_available() else "no (training runs in fp32)"


def check_gpu() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU is enough for the lab)"


def time_one_step() -> str:
    import ptune
    from ptune.data import load_builtin
    from ptune.engine.precision import bf16_autocast, bf16_available

    tok = ptune.load_tokenizer("minilm")
    task, splits = load_builtin("bbc")
    model = ptune.apply(ptune.load_base("minilm"), ptune.PTuningConfig(num_virtual_tokens=10, encoder="mlp"),
                        head=ptune.HeadConfig("classification", num_labels=len(task.labels)), template="{text}",
                        tokenizer=tok)
    enc = ptune.TemplateEncoder(model.template, tok, max_length=128)
    batch = ptune.batching.collate([enc.encode(r) for r in splits["train"][:16]], pad_id=tok.pad_token_id)
    import torch

    labels = torch.tensor([task.label_to_id[r["label"]] for r in splits["train"][:16]])
    model.train()
    seconds = []
    for _ in range(2):  # the first step also sets up kernels: the second is what training steps cost
        started = time.perf_counter()
        with bf16_autocast() if bf16_available() else torch.autocast("cpu", enabled=False):
            loss = model(**batch, labels=labels).loss
        loss.backward()
        seconds.append(time.perf_counter() - started)
    return f"{seconds[-1]:.2f} s (16 articles x 128 tokens, forward + backward; the first took {seconds[0]:.2f} s)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip timing a training step")
    args = parser.parse_args()
    checks = [("python", check_python)]
    checks += [(p, lambda p=p: version(p)) for p in ("torch", "transformers", "datasets", "accelerate", "ptune")]
    checks += [("MiniLM (packaged model)", check_minilm), ("bbc (packaged data)", check_bbc),
               ("threads", check_threads), ("bf16", check_bf16), ("GPU", check_gpu)]
    if not args.quick:
        checks.append(("one training step", time_one_step))
    failed = []
    width = max(len(name) for name, _ in checks)
    print(f"{'check':<{width}}  status   detail")
    for name, check in checks:
        try:
            detail, status = check(), "ok"
        except Exception as e:  # noqa: BLE001 - every failure becomes a row and the one-line verdict
            detail, status = (str(e).strip().splitlines() or [type(e).__name__])[0], "MISSING"
            failed.append(f"{name}: {detail}")
        print(f"{name:<{width}}  {status:<7}  {detail}", flush=True)
    if failed:
        print(f"setup check failed: {failed[0]}" + (f" (and {len(failed) - 1} more above)" if len(failed) > 1 else ""),
              file=sys.stderr)
        return 1
    print("setup check passed: go on with 2_train_p_tuning.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())
