"""The client model's own head: which transformers class loads an export (``AutoModelFor...``), and
whether ptune's head maps onto that class's head. The mapping is not guessed: the transformers head is
built, loaded with ptune's weights, run on ptune's body and must give ptune's logits; where it does not,
the export holds the body and ptune's head beside it. Shared by the PEFT and the merged export, with
the notes both give about the head (how to apply a head file, where a verbalizer reads its logits).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from ..heads import head_kind
from ..methods.lora import LowRankLayer, is_linear_like
from ..model import PtuneModel
from ..models import BASE_CLASSES
from .common import REPORT_NAME, _device, _gap, _plain_probe, _scale_tol, _Source

TASK_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "TOKEN_CLS": "AutoModelForTokenClassification"}


@dataclass
class _ClientHead:
    """Which transformers class the client loads, and where ptune's head goes in it."""

    auto_class: str  # AutoModelForSequenceClassification | AutoModel | AutoModelForCausalLM | ...
    task_type: str  # PEFT's task type
    body_prefix: str = ""  # the body's name inside the client model ("bert."), "" when ptune's base is the client
    head_module: str | None = None  # the client's head module (PEFT's modules_to_save)
    head_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # relative to the client model
    class_name: str = ""
    module_names: frozenset[str] = frozenset()  # the client model's linear layers (target_modules check)
    reason: str | None = None  # why ptune's head could not become the client's own


# ------------------------------------------------------------------------------- the client's own head


def _client_head(source: _Source, body_state: dict[str, torch.Tensor] | None) -> _ClientHead:
    """The transformers class that loads the export, with ptune's head mapped into it where it fits."""
    model = source.model
    spec = model.spec
    kind = head_kind(spec.head.kind)
    if spec.base.kind != "backbone":  # ptune's base is the masked / causal LM itself, with its own LM head
        task_type = kind.peft_task_type(spec.base.is_encoder) or "FEATURE_EXTRACTION"
        return _ClientHead(BASE_CLASSES[spec.base.kind], task_type, class_name=type(model.base).__name__,
                           module_names=frozenset(_linear_names(model.base)))
    plain = _ClientHead("AutoModel", "FEATURE_EXTRACTION", class_name=type(model.base).__name__,
                        module_names=frozenset(_linear_names(model.base)))
    wanted = kind.peft_task_type(spec.base.is_encoder)
    if not dict(model.head.state_dict()):
        return plain
    if wanted not in TASK_CLASSES:
        plain.reason = f"PEFT has no task type for a {spec.head.kind} head"
        return plain
    mapped, reason = _map_head(source, TASK_CLASSES[wanted], wanted, body_state)
    if mapped is None:
        plain.reason = reason
        return plain
    return mapped


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers (a low-rank layer under the name of the layer it wraps)."""
    return [n for n, m in model.named_modules() if (is_linear_like(m) or isinstance(m, LowRankLayer))
            and not n.endswith(".base_layer")]


def _linear_of(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(weight, bias) when ``state`` is one linear layer's parameters, under any prefix."""
    weights = [k for k in state if k.endswith("weight")]
    if len(weights) != 1 or len(state) > 2 or state[weights[0]].dim() != 2:
        return None
    biases = [k for k in state if k.endswith("bias")]
    return state[weights[0]], state[biases[0]] if biases else None


def _map_head(source: _Source, auto_class: str, task_type: str,
              body_state: dict[str, torch.Tensor] | None) -> tuple[_ClientHead | None, str]:
    """ptune's head as the head of ``auto_class``, checked by running both on the same hidden states."""
    import transformers

    model = source.model
    ours = {k: v.detach() for k, v in model.head.state_dict().items()}
    cfg = copy.deepcopy(model.base.config)
    cfg.num_labels = model.head_config.num_labels
    try:
        with torch.device("meta"):
            client = getattr(transformers, auto_class).from_config(cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError, KeyError, ...
        return None, f"transformers has no {auto_class} for {cfg.model_type} ({type(e).__name__})"
    name = type(client).__name__
    prefix = client.base_model_prefix
    if not isinstance(getattr(client, prefix, None), nn.Module):
        return None, f"{name} keeps its body under no '{prefix}' attribute"
    module_names = frozenset(_linear_names(client))
    children = [(n, m) for n, m in client.named_children() if n != prefix]
    with_params = [(n, m) for n, m in children if any(True for _ in m.parameters())]
    linear = _linear_of(ours)
    if len(with_params) != 1 or linear is None:
        return None, f"{name}'s head and ptune's {model.head_config.kind} head have different parts"
    head_name, head = with_params[0]
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    w, b = linear
    if set(shapes) == {"weight", "bias"} and shapes["weight"] == tuple(w.shape) and b is not None:
        tensors = {"weight": w, "bias": b}
    elif set(shapes) == {"weight"} and shapes["weight"] == tuple(w.shape):
        return None, (f"{name}'s {head_name} layer has no bias and ptune's classifier has one"
                      if b is not None else f"{name}'s {head_name} layer differs")
    elif (set(shapes) == {"dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"} and b is not None
          and body_state is not None and "pooler.dense.weight" in body_state
          and shapes["out_proj.weight"] == tuple(w.shape)):
        # RoBERTa-style head: dense + tanh + out_proj on the first token, which is ptune's "pooler" pooling
        tensors = {"dense.weight": body_state["pooler.dense.weight"], "dense.bias": body_state["pooler.dense.bias"],
                   "out_proj.weight": w, "out_proj.bias": b}
    else:
        return None, f"{name}'s {head_name} ({', '.join(sorted(shapes))}) has no counterpart in ptune's head"
    # the check: the client's head on ptune's body (shared, not copied) against ptune's head
    dev = _device(model)
    head.to_empty(device=dev)
    head.load_state_dict({k: v.to(dev) for k, v in tensors.items()})
    for _, child in children:
        child.to(dev).eval()
    setattr(client, prefix, model.backbone)
    batch = _plain_probe(source)
    switch = nullcontext() if model.adapter.trains_base else model.disable_adapter()  # no prompts: same inputs
    try:
        with switch:
            want = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            got = client(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    except Exception as e:  # noqa: BLE001 - e.g. a decoder without a pad token id for its last-token pooling
        return None, f"{name} could not run on ptune's body ({type(e).__name__}: {e})"
    diff = _gap(want, got, None, batch["attention_mask"])
    if diff > _scale_tol(want):
        pooling = getattr(model.head, "pooling", None)
        how = f" (ptune pools with pooling={pooling!r}" + (
            "; BertForSequenceClassification-style heads read the pooler's dense + tanh output: train with "
            "--pooling pooler for a head they reproduce)" if pooling == "cls" else ")") if pooling else ""
        return None, f"{name}'s head computes other logits than ptune's on the same hidden states, by up to " \
                     f"{diff:.3g}{how}"
    return _ClientHead(auto_class, task_type, body_prefix=prefix + ".", head_module=head_name,
                       head_tensors={f"{head_name}.{k}": v.detach().cpu().clone() for k, v in tensors.items()},
                       class_name=name, module_names=module_names), ""


def _head_use(model: PtuneModel) -> str:
    """How ptune applies its head file, where it pools (the measured difference applies it so)."""
    pooling = getattr(model.head, "pooling", None)
    where = {"cls": "the first position's hidden state", "last": "the last real token's hidden state",
             "mean": "the mean over real tokens", "pooler": "the model's pooler output"}.get(pooling)
    return f" (logits = classifier(dropout(pooled)), pooled = {where} of the output sequence)" if where else ""


def _lm_notes(model: PtuneModel) -> list[str]:
    ids = model.head_config.label_word_ids
    if not ids:
        return []
    slot = "the last token" if model.spec.causal else "the [MASK] token"
    return [f"the client returns vocabulary logits; ptune's verbalizer reads them at {slot} for the label words' "
            f"first tokens {list(ids)} (labels {list(model.labels)}, in {REPORT_NAME})"]
