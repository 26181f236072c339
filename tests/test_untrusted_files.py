"""Untrusted files: pickle weights are refused unless asked for; adapters are safetensors + JSON only."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ptune
from ptune.errors import ModelLoadError, PtuneError


def test_pickle_only_model_folder_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    from safetensors.torch import load_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"only pickle weight files \(pytorch_model.bin\).*--allow-pickle"):
        ptune.load_base(str(folder))
    model = ptune.load_base(str(folder), allow_pickle=True)  # opted in: transformers reads weights_only
    assert sum(p.numel() for p in model.parameters()) > 0


def test_saved_adapter_is_safetensors_and_json_only(tmp_path, tokenizer):
    from conftest import tiny_base

    model = ptune.apply(tiny_base("bert"), ptune.PTuningConfig(template="[P:2] {text}"), tokenizer=tokenizer,
                        labels=("a", "b"))
    ptune.save_adapter(model, tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["method"] == "p_tuning" and cfg["base_model"]["weights_sha256"]


def test_adapter_folder_without_ptune_files_is_refused(tmp_path):
    (tmp_path / "adapter_model.bin").write_bytes(b"not really")
    with pytest.raises(PtuneError, match="holds no ptune adapter"):
        ptune.load_adapter(tmp_path)
