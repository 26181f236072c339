"""P-Tuning's prompt encoder options, each shown to act: the ablation study (``ptune ablate``) removes
them one by one, so an option that silently did nothing would make its row meaningless.

Each test builds the encoder with the option on and off from the same seed (the same weights) and
checks the exact value the option implies, where that is cheap: residual adds the input, LayerNorm
gives zero mean and unit variance, one MLP layer is one affine map, ``encoder none`` is the identity.
Adapters saved before ``hidden_layer_norm`` existed (format 2 fixtures) must still give their logits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import liven, tiny_base

import ptune
from ptune.batching import collate
from ptune.methods.p_tuning import PromptEncoder

D = 8  # model width of the encoder's inputs and outputs
FIXTURES = Path(__file__).parent / "fixtures"


def encoder(seed: int = 0, **options) -> PromptEncoder:
    torch.manual_seed(seed)
    return PromptEncoder(ptune.PTuningConfig(**options), D).eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 5, D, generator=torch.Generator().manual_seed(seed))  # (tasks, N, d)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def shares_weights(on: PromptEncoder, off: PromptEncoder) -> None:
    """``on`` has every tensor of ``off``, equal (same seed): the option is the only difference."""
    on_sd, off_sd = on.state_dict(), off.state_dict()
    assert set(off_sd) <= set(on_sd)
    for k, v in off_sd.items():
        torch.testing.assert_close(on_sd[k], v, atol=0, rtol=0)


def mlp_by_hand(enc: PromptEncoder, x: torch.Tensor, hidden_norm: bool) -> torch.Tensor:
    """Linear -> (LayerNorm) -> ReLU -> ... -> Linear, written out from the encoder's weights."""
    linears = [m for m in enc.mlp_head if isinstance(m, torch.nn.Linear)]
    for lin in linears[:-1]:
        x = lin(x)
        x = torch.relu(F.layer_norm(x, x.shape[-1:]) if hidden_norm else x)
    return linears[-1](x)


# ---------------------------------------------------------------------------------------------- residual

@pytest.mark.parametrize("kind", ["mlp", "lstm", "none"])
def test_residual_adds_the_input_to_the_output(kind):
    on, off = encoder(encoder=kind, residual=True), encoder(encoder=kind, residual=False)
    shares_weights(on, off)
    assert n_params(on) == n_params(off)
    x = inputs()
    with torch.no_grad():
        got, without = on(x), off(x)
    torch.testing.assert_close(got, without + x, atol=1e-6, rtol=0)
    assert not torch.allclose(got, without, atol=1e-3)


def test_residual_comes_before_the_output_layer_norm():
    on = encoder(encoder="mlp", residual=True, layer_norm=True)
    off = encoder(encoder="mlp", residual=False, layer_norm=False)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(on(x), F.layer_norm(off(x) + x, (D,)), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- layer norm

@pytest.mark.parametrize("kind", ["mlp", "lstm", "none"])
def test_output_layer_norm_normalises_each_prompt_vector(kind):
    on, off = encoder(encoder=kind, layer_norm=True), encoder(encoder=kind, layer_norm=False)
    shares_weights(on, off)
    assert n_params(on) == n_params(off) + 2 * D
    x = inputs()
    with torch.no_grad():
        got, without = on(x), off(x)
    torch.testing.assert_close(got.mean(-1), torch.zeros(1, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(got.var(-1, unbiased=False), torch.ones(1, 5), atol=1e-3, rtol=0)
    torch.testing.assert_close(got, F.layer_norm(without, (D,)), atol=1e-5, rtol=0)
    assert not torch.allclose(got, without, atol=1e-3)


@pytest.mark.parametrize("layers, hidden", [(2, 16), (3, 16)])
def test_hidden_layer_norm_sits_between_the_mlp_layers(layers, hidden):
    options = dict(encoder="mlp", encoder_num_layers=layers, encoder_hidden_size=hidden)
    on, off = encoder(**options, hidden_layer_norm=True), encoder(**options)
    shares_weights(on, off)
    assert n_params(on) == n_params(off) + (layers - 1) * 2 * hidden  # one LayerNorm per hidden layer
    x = inputs()
    with torch.no_grad():
        got, without = on(x), off(x)
        torch.testing.assert_close(got, mlp_by_hand(on, x, hidden_norm=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(without, mlp_by_hand(off, x, hidden_norm=False), atol=1e-5, rtol=0)
    assert not torch.allclose(got, without, atol=1e-3)
    # the output itself is not normalised (that is layer_norm's job)
    assert got.mean(-1).abs().max() > 1e-3


def test_hidden_layer_norm_in_the_lstm_encoders_mlp_head():
    on, off = encoder(encoder="lstm", hidden_layer_norm=True), encoder(encoder="lstm")
    shares_weights(on, off)
    assert n_params(on) == n_params(off) + 2 * D  # its hidden layer is 2 * (D // 2) wide
    x = inputs()
    with torch.no_grad():
        got, without = on(x), off(x)
        h = on.lstm_head(x)[0]
        torch.testing.assert_close(got, mlp_by_hand(on, h, hidden_norm=True), atol=1e-5, rtol=0)
    assert not torch.allclose(got, without, atol=1e-3)


@pytest.mark.parametrize("options", [dict(encoder="mlp", encoder_num_layers=1), dict(encoder="none")])
def test_hidden_layer_norm_without_a_hidden_layer_changes_nothing(options):
    """Documented: no hidden layer, nothing to normalise (so an ablation can drop the middle layer
    without also switching the option off)."""
    on, off = encoder(**options, hidden_layer_norm=True), encoder(**options)
    assert n_params(on) == n_params(off)
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(on(x), off(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("kind", ["mlp", "lstm", "none"])
def test_dropout_acts_in_training_only(kind):
    on, off = encoder(encoder=kind, encoder_dropout=0.5), encoder(encoder=kind)
    shares_weights(on, off)
    x = inputs()
    with torch.no_grad():
        eval_a, eval_b, plain = on(x), on(x), off(x)
        torch.testing.assert_close(eval_a, eval_b, atol=0, rtol=0)  # eval: deterministic
        torch.testing.assert_close(eval_a, plain, atol=0, rtol=0)  # and the same as no dropout
        on.train()
        train_a, train_b = on(x), on(x)
    assert not torch.allclose(train_a, eval_a, atol=1e-3)
    assert not torch.allclose(train_a, train_b, atol=1e-3)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_dropout_acts_between_the_mlp_layers(kind):
    """The input of the MLP's last linear layer is ReLU(hidden), with units dropped and the rest scaled."""
    p = 0.5
    enc = encoder(encoder=kind, encoder_dropout=p, encoder_hidden_size=16).train()
    seen = {}
    first = enc.lstm_head if kind == "lstm" else enc.mlp_head[0]
    first.register_forward_pre_hook(lambda m, i: seen.update(first_in=i[0]))
    enc.mlp_head[0].register_forward_hook(lambda m, i, o: seen.update(hidden=o))
    enc.mlp_head[2].register_forward_pre_hook(lambda m, i: seen.update(last_in=i[0]))
    x = inputs()
    with torch.no_grad():
        enc(x)
    for got, full in [(seen["first_in"], x / (1 - p)), (seen["last_in"], torch.relu(seen["hidden"]) / (1 - p))]:
        assert torch.all((got == 0) | torch.isclose(got, full))  # each unit dropped, or kept and scaled
        assert ((got == 0) & (full != 0)).float().mean() > 0.1  # about half of them dropped


def test_dropout_acts_between_the_lstm_layers():
    two = encoder(encoder="lstm", encoder_dropout=0.5, encoder_num_layers=2)
    assert two.lstm_head.dropout == 0.5
    two.lstm_head.train()
    x = inputs()
    with torch.no_grad():
        a, b = two.lstm_head(x)[0], two.lstm_head(x)[0]  # the encoder's input dropout left out
    assert not torch.allclose(a, b, atol=1e-4)
    one = encoder(encoder="lstm", encoder_dropout=0.5, encoder_num_layers=1)  # no layer in between
    one.lstm_head.train()
    with torch.no_grad():
        torch.testing.assert_close(one.lstm_head(x)[0], one.lstm_head(x)[0], atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- num layers

def test_one_mlp_layer_is_one_affine_map():
    one, two = encoder(encoder="mlp", encoder_num_layers=1), encoder(encoder="mlp", encoder_num_layers=2)
    assert n_params(one) == D * D + D
    assert n_params(two) == 2 * (D * D + D)
    assert [type(m) for m in one.mlp_head] == [torch.nn.Linear]
    x = inputs()
    lin = one.mlp_head[0]
    with torch.no_grad():
        torch.testing.assert_close(one(x), x @ lin.weight.T + lin.bias, atol=1e-6, rtol=0)
        assert not torch.allclose(one(x), two(x), atol=1e-3)


def test_lstm_layers_count_lstm_layers_and_keep_the_mlp_head():
    one, two = encoder(encoder="lstm", encoder_num_layers=1), encoder(encoder="lstm", encoder_num_layers=2)
    h = D // 2
    assert one.lstm_head.num_layers == 1 and two.lstm_head.num_layers == 2
    lstm_layer2 = 2 * (4 * h * 2 * h + 4 * h * h + 8 * h)  # two directions reading the 2h-wide first layer
    assert n_params(two) - n_params(one) == lstm_layer2
    assert len([m for m in one.mlp_head if isinstance(m, torch.nn.Linear)]) == 2
    x = inputs()
    with torch.no_grad():
        assert not torch.allclose(one(x), two(x), atol=1e-3)


# ------------------------------------------------------------------------------------------ encoder none

def test_no_encoder_passes_the_inputs_through():
    enc = encoder(encoder="none")
    assert n_params(enc) == 0
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(enc(x), x, atol=0, rtol=0)
    model_inputs = encoder(encoder="none", encoder_dropout=0.3)
    with torch.no_grad():
        torch.testing.assert_close(model_inputs(x), x, atol=0, rtol=0)  # eval: dropout off


# ------------------------------------------------------------------------------------ options and files

def test_hidden_layer_norm_is_an_option_by_name(tokenizer, tmp_path):
    """From plain values (YAML, CLI, a saved config), saved, and reloaded with the same logits."""
    from ptune.methods import make_config

    cfg = make_config("p_tuning", num_virtual_tokens=3, encoder="mlp", encoder_num_layers=3,
                      encoder_hidden_size=16, hidden_layer_norm=True, layer_norm=True, encoder_dropout=0.1)
    model = ptune.apply(liven(tiny_base("bert")), cfg, tokenizer=tokenizer,
                        head=ptune.HeadConfig("classification", num_labels=2, dropout=0.0), labels=["a", "b"])
    norms = model.adapter.encoder.hidden_norms
    with torch.no_grad():
        for n in norms:  # not the identity init, so the file must carry them
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.5, 0.5)
    enc = ptune.TemplateEncoder(model.template, tokenizer)
    batch = collate([enc.encode({"text": t}) for t in ["the team won", "bake the bread"]], pad_id=0)
    model.eval()
    with torch.no_grad():
        before = model(**batch).logits
    path = ptune.save_adapter(model, tmp_path / "a")
    saved = json.loads((path / "adapter_config.json").read_text())["method_config"]
    assert saved["hidden_layer_norm"] is True and saved["layer_norm"] is True
    loaded = ptune.load_adapter(path, base=liven(tiny_base("bert")), tokenizer=tokenizer).eval()
    assert len(loaded.adapter.encoder.hidden_norms) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["format2_p_tuning_mlp", "format2_p_tuning_lstm"])
def test_format2_adapters_from_before_hidden_layer_norm_give_the_same_logits(name, tokenizer):
    """Saved before hidden_layer_norm existed (mlp: 3 layers, residual, layer_norm, dropout; lstm:
    layer_norm, dropout); their configs lack the key and must mean what they meant."""
    path = FIXTURES / name
    expected = json.loads((path / "expected_logits.json").read_text())
    assert "hidden_layer_norm" not in json.loads((path / "adapter_config.json").read_text())["method_config"]
    model = ptune.load_adapter(path, base=liven(tiny_base("bert")), tokenizer=tokenizer).eval()
    assert model.method_config.layer_norm and not model.method_config.hidden_layer_norm
    assert not hasattr(model.adapter.encoder, "hidden_norms")
    enc = ptune.TemplateEncoder(model.template, tokenizer, max_length=32, causal=False)
    batch = collate([enc.encode({"text": t}) for t in expected["texts"]], pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, torch.tensor(expected["logits"]), atol=1e-5, rtol=1e-4)


def test_cli_offers_the_encoder_options():
    from ptune.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train", "--method", "p_tuning", "--encoder", "mlp", "--encoder-num-layers", "1",
                              "--hidden-layer-norm", "true", "--layer-norm", "false", "--residual", "false",
                              "--encoder-dropout", "0.1"])
    options = {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith("method.")}
    assert options == {"encoder": "mlp", "encoder_num_layers": 1, "hidden_layer_norm": True, "layer_norm": False,
                       "residual": False, "encoder_dropout": 0.1}
    help_text = " ".join(parser._subparsers._group_actions[0].choices["train"].format_help().split())
    assert "--hidden-layer-norm" in help_text and "before its ReLU" in help_text
