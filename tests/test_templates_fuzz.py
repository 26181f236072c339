"""Property-based fuzzing of the template parser and encoder: a valid template or a TemplateError."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ptune.errors import ConfigError, DataError, TemplateError
from ptune.templates import Template, TemplateEncoder

pieces = st.sampled_from(["[P]", "[P:3]", "[P:0]", "[P:", "[P:x]", "{text}", "{mask}", "{", "}", "{{", "}}",
                          "{ text }", "{1x}", "{}", "capital", " ", "[", "]", "é", "{text_b}"])
templates = st.one_of(st.text(max_size=30), st.lists(pieces, max_size=10).map("".join))


@settings(max_examples=400, deadline=None)
@given(templates)
def test_parse_gives_template_or_template_error(source):
    try:
        t = Template.parse(source)
    except TemplateError as e:
        assert str(e)
        return
    assert t.fields and t.num_virtual_tokens >= 0
    assert sum(s.kind == "mask" for s in t.segments) <= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(pieces, max_size=8).map("".join), st.text(min_size=1, max_size=200),
       st.integers(min_value=1, max_value=40))
def test_encode_keeps_virtual_tokens_and_mask(tokenizer, source, text, max_length):
    try:
        t = Template.parse(source + " {text}")
        enc = TemplateEncoder(t, tokenizer, max_length=max_length)
        out = enc.encode({"text": text, "text_b": text})
    except (ConfigError, DataError) as e:  # TemplateError is a ConfigError; so is "max_length leaves no room";
        # pieces can spell a field the record lacks ("{" "capital" "}"): a DataError naming it
        assert str(e)
        return
    assert len(out.input_ids) <= max_length
    assert sorted(i for i in out.virtual_index if i >= 0) == list(range(t.num_virtual_tokens))
    if t.has_mask:
        assert out.input_ids[out.label_position] == tokenizer.mask_token_id
