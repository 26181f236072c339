"""Templates: parsing, malformed-template errors, and what encoding puts where.

Encoding is checked against the tokenizer itself (MiniLM WordPiece: [CLS] ... [SEP], [MASK] = 103),
so every position asserted here is one a model will actually see.
"""

from __future__ import annotations

import pytest

from ptune import ConfigError, Template, TemplateEncoder, TemplateError
from ptune.templates import Segment


def kinds(tpl: Template) -> list[tuple[str, object]]:
    return [(s.kind, s.value) for s in tpl.segments]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- parsing


def test_parse_virtual_segments_fields_and_mask():
    tpl = Template.parse("[P:3] {text} [P:2] capital [P] {mask}")
    assert kinds(tpl) == [("virtual", 3), ("text", " "), ("field", "text"), ("text", " "), ("virtual", 2),
                          ("text", " capital "), ("virtual", 1), ("text", " "), ("mask", None)]
    assert tpl.num_virtual_tokens == 6
    assert tpl.fields == ("text",)
    assert tpl.has_mask
    assert str(tpl) == "[P:3] {text} [P:2] capital [P] {mask}"


def test_parse_several_fields_no_mask():
    tpl = Template.parse("Premise: {text} Hypothesis: {text_b}")
    assert tpl.fields == ("text", "text_b")
    assert tpl.num_virtual_tokens == 0
    assert not tpl.has_mask
    assert tpl.segments[0] == Segment("text", "Premise: ")


def test_parse_field_name_may_be_padded_with_spaces():
    assert Template.parse("{ text }").fields == ("text",)


def test_parse_brace_escapes_are_literal_text():
    tpl = Template.parse("{{x}} {text} }}")
    assert kinds(tpl) == [("text", "{x} "), ("field", "text"), ("text", " }")]
    # an escaped brace right next to a field
    tpl = Template.parse("{{{text}}}")
    assert kinds(tpl) == [("text", "{"), ("field", "text"), ("text", "}")]


def test_with_prefix_prompt_prepends_virtual_tokens():
    tpl = Template.parse("{text} {mask}").with_prefix_prompt(4)
    assert tpl.segments[0] == Segment("virtual", 4)
    assert tpl.num_virtual_tokens == 4 and tpl.has_mask


@pytest.mark.parametrize("source, needle", [
    ("{text", "never closed"),
    ("hello {text} {mask", "never closed"),
    ("{te xt}", "not a field name"),
    ("{1abc} {text}", "not a field name"),
    ("{} {text}", "not a field name"),
    ("[P:0] {text}", "zero virtual tokens"),
    ("[P:x] {text}", "malformed virtual-token marker"),
    ("[P:-2] {text}", "malformed virtual-token marker"),
    ("just words [P:2]", "no input field"),
    ("{mask}", "no input field"),
    ("{text} {mask} {mask}", "more than one {mask}"),
    ("{text} }", "unmatched '}'"),
    ("", "empty"),
    ("   ", "empty"),
])
def test_malformed_templates_raise_a_useful_error(source, needle):
    with pytest.raises(TemplateError) as info:
        Template.parse(source)
    msg = str(info.value)
    assert needle in msg
    if source.strip():
        assert repr(source) in msg  # the message quotes the template it refers to


def test_error_names_the_position():
    with pytest.raises(TemplateError, match="position 7"):
        Template.parse("{text} [P:0]")


def test_template_error_is_a_config_error():
    with pytest.raises(ConfigError):
        Template.parse("{text")


# ---------------------------------------------------------------- encoding


def test_virtual_index_numbering_across_segments(tokenizer):
    enc = TemplateEncoder("[P:2] {text} [P:1] capital [P:3] {mask}", tokenizer)
    e = enc.encode({"text": "paris is nice"})
    text_ids = ids(tokenizer, "paris is nice")
    cap = ids(tokenizer, " capital")
    expected = ([tokenizer.cls_token_id] + [0, 0] + text_ids + [0] + cap + [0, 0, 0]
                + [tokenizer.mask_token_id, tokenizer.sep_token_id])
    assert e.input_ids == expected
    vpos = [i for i, v in enumerate(e.virtual_index) if v >= 0]
    assert [e.virtual_index[i] for i in vpos] == [0, 1, 2, 3, 4, 5]
    # placeholders sit where the template put them
    assert vpos == [1, 2, 3 + len(text_ids), 4 + len(text_ids) + len(cap), 5 + len(text_ids) + len(cap),
                    6 + len(text_ids) + len(cap)]
    assert all(e.input_ids[i] == enc.placeholder_id for i in vpos)
    assert all(v == -1 for i, v in enumerate(e.virtual_index) if i not in vpos)
    assert len(e.input_ids) == len(e.virtual_index) == len(e.word_ids)


def test_label_position_masked_lm_points_at_mask_token(tokenizer):
    enc = TemplateEncoder("[P:2] {text} It was {mask} .", tokenizer)
    e = enc.encode({"text": "a lovely film"})
    assert e.input_ids[e.label_position] == tokenizer.mask_token_id
    assert e.input_ids.count(tokenizer.mask_token_id) == 1
    assert e.input_ids[-1] == tokenizer.sep_token_id  # masked LMs keep their closing special token
    assert e.input_ids[e.label_position + 1] == ids(tokenizer, " .")[0]


def test_label_position_causal_is_last_token_before_slot(tokenizer):
    enc = TemplateEncoder("[P:2] {text} it was {mask}", tokenizer, causal=True)
    e = enc.encode({"text": "a lovely film"})
    assert e.label_position == len(e.input_ids) - 1
    assert e.input_ids[e.label_position] == ids(tokenizer, " was")[0]
    assert tokenizer.mask_token_id not in e.input_ids
    assert tokenizer.sep_token_id not in e.input_ids  # nothing may follow the next-token slot


def test_causal_label_slot_must_end_the_template(tokenizer):
    with pytest.raises(TemplateError, match="must end the template"):
        TemplateEncoder("{text} {mask} .", tokenizer, causal=True)


def test_causal_label_position_can_be_a_virtual_token(tokenizer):
    e = TemplateEncoder("{text} [P:2]{mask}", tokenizer, causal=True).encode({"text": "hi"})
    assert e.label_position == len(e.input_ids) - 1
    assert e.virtual_index[e.label_position] == 1


def test_causal_target_labels_only_on_target(tokenizer):
    enc = TemplateEncoder("[P:2] {text}", tokenizer, causal=True)
    e = enc.encode({"text": "question here"}, target=" answer words")
    tgt = ids(tokenizer, " answer words")
    scored = [(i, lab) for i, lab in enumerate(e.labels) if lab != -100]
    assert [lab for _, lab in scored] == tgt
    assert [e.input_ids[i] for i, _ in scored] == tgt
    assert all(e.virtual_index[i] == -1 for i, _ in scored)


def test_truncation_keeps_virtual_tokens_anchors_specials_and_mask(tokenizer):
    src = "[P:3] {text} [P:2] capital [P:1] {mask}"
    long_text = " ".join(["word"] * 50)
    full = TemplateEncoder(src, tokenizer, max_length=512).encode({"text": long_text})
    enc = TemplateEncoder(src, tokenizer, max_length=24)
    e = enc.encode({"text": long_text})
    assert len(e.input_ids) == 24 < len(full.input_ids)
    assert sorted(v for v in e.virtual_index if v >= 0) == list(range(6))
    assert e.input_ids[0] == tokenizer.cls_token_id and e.input_ids[-1] == tokenizer.sep_token_id
    assert e.input_ids[e.label_position] == tokenizer.mask_token_id
    assert ids(tokenizer, " capital")[0] in e.input_ids
    # only the field got shorter: 24 - ([CLS] + 6 virtual + capital + [MASK] + [SEP]) = 14 field tokens kept
    word = ids(tokenizer, "word")[0]
    assert e.input_ids.count(word) == 14
    assert e.input_ids[4:4 + 14] == [word] * 14
    # virtual tokens keep their order relative to the anchors
    cap_pos = e.input_ids.index(ids(tokenizer, " capital")[0])
    assert [e.virtual_index[i] for i in range(cap_pos - 2, cap_pos)] == [3, 4]
    assert e.virtual_index[cap_pos + 1] == 5


def test_truncation_shortens_the_longest_field_first(tokenizer):
    src = "{text} [P:2] {text_b} {mask}"
    rec = {"text": " ".join(["alpha"] * 30), "text_b": "short one here"}
    b_ids = ids(tokenizer, " short one here")
    e = TemplateEncoder(src, tokenizer, max_length=20).encode(rec)
    assert len(e.input_ids) == 20
    n = len(e.input_ids)
    # text_b survives whole, just before [MASK] [SEP]
    assert e.input_ids[n - 2 - len(b_ids):n - 2] == b_ids
    alpha = ids(tokenizer, "alpha")[0]
    assert e.input_ids.count(alpha) == 20 - 2 - 2 - 1 - len(b_ids)  # specials, virtual, [MASK]
    # with two long fields both are cut, to within one token of each other
    rec = {"text": " ".join(["alpha"] * 30), "text_b": " ".join(["beta"] * 30)}
    e = TemplateEncoder(src, tokenizer, max_length=20).encode(rec)
    beta = ids(tokenizer, " beta")[0]
    assert len(e.input_ids) == 20
    assert abs(e.input_ids.count(alpha) - e.input_ids.count(beta)) <= 1
    assert e.input_ids.count(alpha) + e.input_ids.count(beta) == 20 - 5


def test_max_length_too_small_for_the_fixed_part(tokenizer):
    enc = TemplateEncoder("[P:8] {text} {mask}", tokenizer, max_length=10)
    with pytest.raises(ConfigError, match="max_length=10"):
        enc.encode({"text": "hello"})


def test_missing_field_is_a_data_error(tokenizer):
    from ptune import DataError

    with pytest.raises(DataError, match="text_b"):
        TemplateEncoder("{text} {text_b}", tokenizer).encode({"text": "x"})


WORDS = ["John", "lives", "unbelievably", "in", "Kuala", "Lumpur"]
TAGS = [1, 0, 0, 0, 2, 3]


def test_tagging_alignment_under_infix_template(tokenizer):
    enc = TemplateEncoder("[P:2] {tokens} [P:1] end", tokenizer)
    e = enc.encode({"tokens": WORDS}, tagging_field="tokens", tags=TAGS)
    assert e.num_words == len(WORDS)
    assert len(e.labels) == len(e.input_ids) == len(e.word_ids)
    firsts = [i for i, w in enumerate(e.word_ids) if w >= 0]
    assert [e.word_ids[i] for i in firsts] == list(range(len(WORDS)))  # each word once, in order
    for i, w in zip(firsts, range(len(WORDS))):
        assert e.input_ids[i] == ids(tokenizer, " " + WORDS[w])[0]  # the word's first sub-token
        assert e.labels[i] == TAGS[w]
        assert e.virtual_index[i] == -1
    assert sum(lab != -100 for lab in e.labels) == len(WORDS)
    # continuation pieces of "unbelievably" carry no label
    ub = ids(tokenizer, " unbelievably")
    start = firsts[2]
    assert e.input_ids[start:start + len(ub)] == ub
    assert e.labels[start + 1:start + len(ub)] == [-100] * (len(ub) - 1)
    # virtual tokens, the anchor and the special tokens carry no label
    for i, v in enumerate(e.virtual_index):
        if v >= 0:
            assert e.labels[i] == -100 and e.word_ids[i] == -1
    assert [e.virtual_index[i] for i in range(len(e.input_ids)) if e.virtual_index[i] >= 0] == [0, 1, 2]
    assert e.input_ids[-2] == ids(tokenizer, "end")[0] and e.labels[-2] == -100
    assert e.labels[0] == -100 and e.labels[-1] == -100


def test_tagging_truncation_keeps_leading_words(tokenizer):
    enc = TemplateEncoder("[P:2] {tokens} [P:1] end", tokenizer, max_length=10)
    e = enc.encode({"tokens": WORDS}, tagging_field="tokens", tags=TAGS)
    assert len(e.input_ids) == 10
    kept = [w for w in e.word_ids if w >= 0]
    assert kept == list(range(len(kept))) and 0 < len(kept) < len(WORDS)
    assert e.num_words == len(WORDS)  # the caller can tell words were cut
    assert [e.virtual_index[i] for i in range(10) if e.virtual_index[i] >= 0] == [0, 1, 2]


def test_masked_template_needs_a_mask_token():
    class NoMask:
        mask_token_id = None
        pad_token_id = 0
        unk_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [5] * len(text.split())}

    with pytest.raises(TemplateError, match="no mask token"):
        TemplateEncoder("{text} {mask}", NoMask())


def test_spaces_before_a_field_stay_with_the_field_under_bpe():
    """ "The capital of {subject} is" must tokenize as the running text does (" France", not " " + "France")."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = ["The capital of France is Paris.", "The capital of Japan is Tokyo."] * 20
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
    enc = TemplateEncoder("The capital of {subject} is{mask}", tok, causal=True)
    got = enc.encode({"subject": "France"})
    assert got.input_ids == tok("The capital of France is", add_special_tokens=False)["input_ids"]
    assert got.label_position == len(got.input_ids) - 1
    spaced = TemplateEncoder("[P:2] {subject} is [P:1]{mask}", tok, causal=True).encode({"subject": "Japan"})
    assert spaced.input_ids[2:-1] == tok(" Japan is", add_special_tokens=False)["input_ids"]


def test_backslash_escapes_in_literal_text():
    # what a shell passes for --template "{text}\n[P:2]About{mask}": a backslash and an n
    t = Template.parse("{text}\\n[P:2]About{mask} a\\\\b\\tc \\q")
    texts = [s.value for s in t.segments if s.kind == "text"]
    assert texts == ["\n", "About", " a\\b\tc \\q"]  # \n, \\, \t become characters; others stay as typed
