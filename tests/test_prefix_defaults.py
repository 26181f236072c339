"""Prefix tuning learns with its defaults (issue #15), on the real packaged MiniLM.

With the defaults before the fix (prefix embedding drawn from N(0, 1), lr 1e-2, MLP width 512) every
AdamW step moved the MLP's 512-wide output layer so far that the prefixes blew up (std 5-8 after 12-20
steps, against ~1 for MiniLM's own keys): every token attended to them, the body's output stopped
depending on the input, and training stayed at the majority class (bbc: 0.2287 after an epoch; see
bench/results/prefix_defaults.md). The same collapse shows on sixteen sport/cooking sentences in a dozen
steps, which is what these tests run: the defaults must learn them (at their lr and at 3x it), the old
settings must not (so the task tells the two apart).
"""

from __future__ import annotations

import pytest
import torch
from test_minilm_integration import COOKING, SPORT

import ptune
from ptune.batching import collate
from ptune.methods.prefix_tuning import PrefixEncoder

pytestmark = pytest.mark.slow

STEPS = 12


def train_losses(config: ptune.PrefixTuningConfig, lr: float, init: str = "default") -> list[float]:
    """Full-batch AdamW steps (clipping 1.0, as ``ptune train``) on the sixteen sentences; the losses."""
    torch.manual_seed(0)
    tok = ptune.load_tokenizer("minilm")
    model = ptune.apply(ptune.load_base("minilm").eval(), config,
                        head=ptune.HeadConfig("classification", num_labels=2, dropout=0.0), tokenizer=tok,
                        labels=["sport", "cooking"])
    if init == "randn":  # the init before issue #15: N(0, 1)
        emb = model.adapter.encoder.embedding
        with torch.no_grad():
            emb.copy_(torch.randn(emb.shape, generator=torch.Generator().manual_seed(config.seed)))
    enc = ptune.TemplateEncoder(model.template, tok, max_length=32)
    batch = collate([enc.encode({"text": t}) for t in SPORT + COOKING], pad_id=tok.pad_token_id,
                    targets=[0] * len(SPORT) + [1] * len(COOKING))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("factor", [1, 3])
def test_defaults_learn_with_room_to_spare(factor):
    """The default config at its default lr learns, and still does at 3x that lr: the default sits away
    from the edge where the prefixes blow up (with the old N(0, 1) init, 3x 3e-3 collapses; with the old
    lr, 3x 1e-2 collapses even from the new init)."""
    cfg = ptune.PrefixTuningConfig()
    assert cfg.prefix_projection  # the MLP reparameterization is what is under test
    losses = train_losses(cfg, factor * ptune.PrefixTuningConfig.default_lr)
    assert losses[0] > 0.5 and max(losses[-3:]) < 0.05, losses  # observed: 0.66 -> < 0.005


def test_old_defaults_collapse():
    """The settings before the fix stay at chance on the same task: what makes the test above mean something."""
    losses = train_losses(ptune.PrefixTuningConfig(encoder_hidden_size=512), 1e-2, init="randn")
    assert min(losses[-3:]) > 0.6, losses  # observed: stuck at ln 2 = 0.693


def test_init_is_small_and_p_tuning_v2_keeps_its_own():
    """The prefix MLP's input starts at the scale of word embeddings (rows of norm ~1); P-Tuning v2's
    prefixes (no MLP) keep N(0, 1) and its learning rate stays 1e-2."""
    H = 384
    enc = PrefixEncoder(ptune.PrefixTuningConfig(), num_layers=2, kv_heads=12, head_dim=32, hidden_size=H)
    norms = enc.embedding.detach().norm(dim=-1)
    assert 0.8 < norms.mean().item() < 1.2
    v2 = PrefixEncoder(ptune.PTuningV2Config(), num_layers=2, kv_heads=12, head_dim=32, hidden_size=H)
    assert 0.9 < v2.embedding.detach().std().item() < 1.1
    assert ptune.PTuningV2Config.default_lr == 1e-2
