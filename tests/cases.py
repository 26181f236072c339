"""The one registry of test cases: methods, heads and tiny architectures. Every parametrised test draws from it.

A method, head or architecture is one row here; tests pick rows by what a row can do (its flags), never by a
list of names of their own, so a new row joins every test it fits. ``test_shared_checks.py::
test_every_method_and_head_has_a_row_and_is_in_the_matrix`` fails until each ``ptune.methods.METHODS`` entry
and each ``ptune.HEAD_KINDS`` entry has a row, and checks the flags against what the library says.

- ``METHOD_CASES``: method -> a config sized for the tiny models, its named variants (other options of the
  same method that tests exercise), its ``ptune train`` options, and flags (what kind of method it is and
  where it runs).
- ``HEAD_CASES``: head kind -> the base it needs, its label count, template tail and example rows, and the
  shape of its logits on those rows.
- ``ARCH_CASES``: tiny random architecture -> its config builder (MiniLM's WordPiece vocabulary for all),
  whether it is a decoder, has biases, and the heads the shared matrix runs on it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import ptune

VOCAB = 30522


# ---------------------------------------------------------------------------------------------- methods

@dataclass(frozen=True)
class MethodCase:
    name: str
    make: Callable[..., Any]  # (template) -> a config sized for the tiny models (hidden 32, 2 layers)
    variants: dict[str, dict] = field(default_factory=dict)  # variant name -> options replacing make()'s
    cli: tuple[str, ...] = ()  # its options for `ptune train` on a tiny model
    input_prompts: bool = False  # trained vectors in the input sequence (prompt tuning, P-Tuning)
    deep_prompts: bool = False  # trained key/value prefixes at every layer (P-Tuning v2, prefix tuning)
    weight_side: bool = False  # changes the base's weights or adds to them (LoRA family, BitFit, full)
    trains_base: bool = False  # its trainable tensors live in the base's own modules (adapter.trains_base)
    trained: bool = True  # False: nothing to train (the hand-written prompt, zero-shot)
    base_4bit: str = "no"  # "no" | "yes" (also on an NF4 base) | "only" (QLoRA: by definition)
    needs_bias: bool = False  # refused on a base without bias terms (BitFit)
    on_t5: bool = False  # runs on an encoder-decoder (test_t5.py runs the shared checks there)
    task_tables: bool = False  # num_tasks: one prompt table per task (multi-task, mixed-task batches)
    peft_exportable: bool = False  # ptune.export writes a PEFT adapter (methods.PeftExportable)
    mergeable: bool = False  # adapter.merge() folds the update into the base's weights
    set_servable: bool = False  # several adapters of it served over one base (AdapterSet)
    keeps_base: bool = True  # disable_adapter() gives the untouched base back (full fine-tuning keeps no copy)
    loop_hooks: bool = False  # hooks into the training loop (methods.TrainingHooks: AdaLoRA's rank budget)

    @property
    def prompts(self) -> bool:
        return self.input_prompts or self.deep_prompts

    def config(self, variant: str | None = None, *, field: str = "text", tail: str = "", **options: Any) -> Any:
        """The row's config (or one variant's); ``field`` / ``tail`` fill a P-Tuning template's input slot."""
        config = self.make(INFIX.replace("{field}", "{%s}" % field) + tail)
        options = {**(self.variants[variant] if variant else {}), **options}
        return dataclasses.replace(config, **options) if options else config


INFIX = "[P:2] {field} [P:1] end"  # P-Tuning's own template: virtual tokens around the input and an anchor

METHOD_CASES: dict[str, MethodCase] = {c.name: c for c in (
    MethodCase("prompt_tuning", lambda tpl: ptune.PromptTuningConfig(num_virtual_tokens=3),
               cli=("--num-virtual-tokens", "4"), input_prompts=True, base_4bit="yes", on_t5=True, task_tables=True,
               peft_exportable=True, set_servable=True),
    MethodCase("p_tuning", lambda tpl: ptune.PTuningConfig(template=tpl, encoder="lstm", encoder_hidden_size=8),
               variants={"mlp": dict(template=None, num_virtual_tokens=3, encoder="mlp", encoder_hidden_size=None,
                                     residual=True),  # virtual tokens first, as PEFT puts them
                         "mlp-layernorm": dict(encoder="mlp", encoder_hidden_size=None, residual=True, layer_norm=True),
                         "mlp-residual-hiddenln": dict(encoder="mlp", encoder_hidden_size=16, residual=True,
                                                       hidden_layer_norm=True),
                         "none-layernorm": dict(encoder="none", encoder_hidden_size=None, layer_norm=True),
                         "lstm-residual-layernorm": dict(encoder_hidden_size=None, residual=True, layer_norm=True),
                         "lstm-layernorm": dict(encoder_hidden_size=None, layer_norm=True),
                         "per_task": dict(template=None, num_virtual_tokens=3, task_encoders="per_task")},
               cli=("--template", "[P:2] {text} [P:1] topic", "--encoder", "mlp"), input_prompts=True,
               base_4bit="yes", on_t5=True, task_tables=True, peft_exportable=True, set_servable=True),
    # every layer, as the paper and PEFT have it (on 2-layer models the default 'auto' keeps only the top one;
    # test_frozen.py and the CLI row, which takes the defaults, cover 'auto')
    MethodCase("p_tuning_v2", lambda tpl: ptune.PTuningV2Config(num_virtual_tokens=3, layers="all"),
               cli=("--num-virtual-tokens", "4"), deep_prompts=True, base_4bit="yes", on_t5=True, task_tables=True,
               peft_exportable=True, set_servable=True),
    MethodCase("prefix_tuning", lambda tpl: ptune.PrefixTuningConfig(num_virtual_tokens=3, encoder_hidden_size=16),
               cli=("--num-virtual-tokens", "4", "--encoder-hidden-size", "16"), deep_prompts=True, base_4bit="yes",
               on_t5=True, task_tables=True, peft_exportable=True, set_servable=True),
    MethodCase("lora", lambda tpl: ptune.LoraConfig(r=2), cli=("--r", "4"), weight_side=True, trains_base=True,
               base_4bit="yes", on_t5=True, peft_exportable=True, mergeable=True, set_servable=True),
    MethodCase("adalora", lambda tpl: ptune.AdaLoraConfig(init_r=3, target_r=2, total_step=10),
               cli=("--init-r", "4", "--target-r", "2"), weight_side=True, trains_base=True, base_4bit="yes",
               peft_exportable=True, mergeable=True, set_servable=True, loop_hooks=True),
    MethodCase("qlora", lambda tpl: ptune.QLoraConfig(r=2), cli=("--r", "4"), weight_side=True, trains_base=True,
               base_4bit="only", peft_exportable=True, set_servable=True),
    MethodCase("bitfit", lambda tpl: ptune.BitFitConfig(), weight_side=True, trains_base=True, base_4bit="yes",
               needs_bias=True, set_servable=True),
    MethodCase("full", lambda tpl: ptune.FullFinetuneConfig(), weight_side=True, trains_base=True, on_t5=True,
               keeps_base=False),
    MethodCase("manual", lambda tpl: ptune.ManualConfig(), trained=False),
)}


def methods(where: Callable[[MethodCase], bool] = lambda c: True, variants: tuple[str, ...] = ()) -> list[str]:
    """Case ids of the trained methods ``where`` picks, then the named variants (``"p_tuning-mlp"``)."""
    picked = [name for name, c in METHOD_CASES.items() if c.trained and where(c)]
    for v in variants:
        method, _, variant = v.partition("-")
        assert variant in METHOD_CASES[method].variants, f"no variant {v!r} in tests/cases.py"
    return picked + list(variants)


def method_config(case_id: str, **kw: Any) -> Any:
    """The config of a case id from ``methods()``: ``"lora"`` or ``"p_tuning-mlp"`` (method, then variant)."""
    method, _, variant = case_id.partition("-")
    return METHOD_CASES[method].config(variant or None, **kw)


def method_of(case_id: str) -> MethodCase:
    return METHOD_CASES[case_id.partition("-")[0]]


# ---------------------------------------------------------------------------------------------- examples

TEXTS = ["the match ended in a draw", "stir the sauce gently", "a late goal won the cup", "bake the bread"]
WORDS = [["John", "lives", "in", "Paris"], ["unbelievably", "good", "pasta"], ["the", "team", "won"],
         ["Kuala", "Lumpur"]]
TAGS = [[1, 0, 0, 2], [0, 0, 3], [0, 1, 0], [2, 2]]
TARGETS = [" yes", " no", " yes", " no"]
CHOICES = [["yes", "no"], ["salt", "sugar", "flour"], ["won", "lost"], ["bread", "cake", "rice", "soup"]]
QA = [("what happened?", "a draw"), ("stir what?", "the sauce"), ("what won?", "a late goal"), ("why?", None)]


def _classes(enc):
    return [enc.encode({"text": t}) for t in TEXTS], [0, 1, 0, 1]


def _tags(enc):
    return [enc.encode({"tokens": w}, tagging_field="tokens", tags=t) for w, t in zip(WORDS, TAGS)], None


def _targets(enc):
    return [enc.encode({"text": t}, target=y) for t, y in zip(TEXTS, TARGETS)], None


def _choices(head):
    def rows(enc):
        from ptune.data import Task

        task = Task(name="mc", head=head)
        return [task.kind.encode(task, enc, {"text": t, "choices": c}, False).encoded
                for t, c in zip(TEXTS, CHOICES)], [0, 2, 1, 3]
    return rows


def _spans(enc):  # one window per record here (short contexts)
    from ptune.data import Task

    task = Task(name="qa", head="span_qa", text_fields=("text", "context"), label_field="answers",
                allow_no_answer=True)
    recs = [{"text": q, "context": c, "answers": {"text": [a] if a else [], "answer_start": [c.index(a)] if a else []}}
            for (q, a), c in zip(QA, TEXTS)]
    return [task.kind.encode(task, enc, r, True).encoded for r in recs], None


# ---------------------------------------------------------------------------------------------- heads

@dataclass(frozen=True)
class HeadCase:
    name: str
    base: str  # "backbone", or "lm": the model's own LM (a masked LM on an encoder, a causal LM on a decoder)
    num_labels: int = 2
    tail: str = ""  # the template's tail after the input field ({mask}, {choice}, the context)
    field: str = "text"  # the input field the template reads
    labels: tuple[str, ...] = ()  # label words (a verbalizer)
    examples: Callable[[Any], tuple[list, list | None]] | None = None  # (encoder) -> (4 rows, targets or None)
    shape: Callable[[int, int], tuple[int, ...]] | None = None  # (rows, longest row) -> the logits' shape
    decoder_only: bool = False  # needs a causal LM (scores with its own next-token log-probs)
    elsewhere: str | None = None  # the base the tiny zoo lacks, and the file running the shared checks on it

    def base_kind(self, decoder: bool) -> str:
        return self.base if self.base != "lm" else ("causal_lm" if decoder else "masked_lm")

    def real(self, row: Any, record: int, n: int) -> Any:
        """One record's logits cut to its real part (``n`` real positions; a record's own choices)."""
        if self.name.startswith("multiple_choice"):  # the batch pads a record's score row with -inf choices
            return row[:len(CHOICES[record])]
        if self.name == "span_qa":  # per window, its real positions
            return row[:, :n]
        return row if row.dim() == 1 else row[:n]

    def template(self) -> str:
        return "{%s}" % self.field + self.tail

    def head_config(self) -> Any:
        return ptune.HeadConfig(self.name, num_labels=self.num_labels, dropout=0.0)


HEAD_CASES: dict[str, HeadCase] = {c.name: c for c in (
    HeadCase("classification", "backbone", examples=_classes, shape=lambda B, T: (B, 2)),
    HeadCase("tagging", "backbone", num_labels=4, field="tokens", examples=_tags, shape=lambda B, T: (B, T, 4)),
    HeadCase("verbalizer", "lm", tail=" {mask}", labels=("good", "bad"), examples=_classes,
             shape=lambda B, T: (B, 2)),
    HeadCase("causal_lm", "causal_lm", examples=_targets, shape=lambda B, T: (B, T, VOCAB), decoder_only=True),
    # one body row per choice, one score row per record out of the head (at most 4 choices)
    HeadCase("multiple_choice", "backbone", num_labels=1, tail=" {choice}", examples=_choices("multiple_choice"),
             shape=lambda B, T: (B, 4)),
    HeadCase("multiple_choice_lm", "causal_lm", num_labels=1, tail=" {choice}", examples=_choices("multiple_choice_lm"),
             shape=lambda B, T: (B, 4), decoder_only=True),
    # windows regrouped per record: (records, most windows, T, start / end)
    HeadCase("span_qa", "backbone", tail=" [SEP] {context}", examples=_spans, shape=lambda B, T: (B, 1, T, 2)),
    HeadCase("seq2seq", "seq2seq_lm", elsewhere="tests/test_t5.py"),  # an encoder-decoder (T5)
)}


# ---------------------------------------------------------------------------------------------- architectures

@dataclass(frozen=True)
class ArchCase:
    name: str
    config: Callable[[], Any]  # a transformers config: hidden 32 (64 for 4-bit), 2 layers, MiniLM's vocabulary
    decoder: bool
    bias: bool = True  # built with bias terms (BitFit needs them)
    heads: tuple[str, ...] = ()  # the heads the shared matrix runs on it
    base_4bit: bool = False  # the shared matrix's NF4 rows: every linear layer whole 64-weight blocks wide
    source: str = ""  # config._ptune_source (the name in an adapter's spec)


def _tf():
    import transformers

    return transformers


COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
ONE_ROW = ("classification", "tagging", "verbalizer")  # the heads every tiny encoder and decoder carries

ARCH_CASES: dict[str, ArchCase] = {c.name: c for c in (
    ArchCase("bert", lambda: _tf().BertConfig(**COMMON, max_position_embeddings=128, hidden_dropout_prob=0.0,
                                              attention_probs_dropout_prob=0.0),
             decoder=False, heads=(*ONE_ROW, "multiple_choice", "span_qa")),
    ArchCase("roberta", lambda: _tf().RobertaConfig(**COMMON, max_position_embeddings=130, pad_token_id=0,
                                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
             decoder=False, heads=("classification", "tagging")),
    ArchCase("gpt2", lambda: _tf().GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=101,
                                              eos_token_id=102, pad_token_id=0),
             decoder=True, heads=(*ONE_ROW, "causal_lm", "multiple_choice", "multiple_choice_lm", "span_qa")),
    ArchCase("llama", lambda: _tf().LlamaConfig(**COMMON, num_key_value_heads=2, max_position_embeddings=128,
                                                bos_token_id=101, eos_token_id=102, pad_token_id=0),
             decoder=True, bias=False, heads=(*ONE_ROW, "causal_lm")),
    ArchCase("gemma3", lambda: _tf().Gemma3TextConfig(**COMMON, num_key_value_heads=2, head_dim=8,
                                                      max_position_embeddings=128, sliding_window=16, bos_token_id=101,
                                                      eos_token_id=102, pad_token_id=0),
             decoder=True, bias=False, heads=("classification", "tagging", "causal_lm")),
    ArchCase("llama64", lambda: _tf().LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                                  max_position_embeddings=64, pad_token_id=0),
             decoder=True, bias=False, heads=("classification", "causal_lm"), base_4bit=True, source="tiny-llama-64"),
)}

ARCHS = tuple(a for a, c in ARCH_CASES.items() if not c.base_4bit)  # the tiny zoo
DECODERS = tuple(a for a in ARCHS if ARCH_CASES[a].decoder)


def fits(method: str, arch: str, quant: str | None = None) -> bool:
    """Whether a method runs on an architecture (plain, or quantized to 4 bits): the shared matrix's rule."""
    m, a = METHOD_CASES[method], ARCH_CASES[arch]
    if (quant is not None) != a.base_4bit:
        return False  # the 4-bit dimension runs on llama64, the plain one on the tiny zoo
    if m.base_4bit == "only":
        return quant is not None
    if quant is not None and m.base_4bit == "no":
        return False
    return a.bias or not m.needs_bias
