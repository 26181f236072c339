"""Generation by a set's adapters, decoded together: one :class:`~ptune.decoding.Decoder` over the set's model.

    gen = aset.generation            # the set's adapters that generate (causal_lm heads), and its bare base
    texts = gen.generate([{"adapter": "chat", "prompt": "Hello"}, {"adapter": None, "prompt": "Water boils at"}])

A request names its adapter (or None: the bare base) and is encoded as ``Run.generate`` encodes it
(the adapter's template around the prompt, its virtual tokens in place); it joins the running batch
at the next step (:meth:`add` / :meth:`step`, for a server that streams), or :meth:`generate` runs a
list of requests to the end. Greedy output equals the adapter's own ``generate`` alone.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..decoding import Decoder, Row, Sampling
from ..errors import ConfigError, DataError
from ..templates import Template, TemplateEncoder


class SetGeneration:
    """The decoding side of an :class:`~ptune.adapter_set.AdapterSet` (``aset.generation``)."""

    def __init__(self, aset: Any) -> None:
        self.set = aset
        tok = aset.tokenizer
        config = getattr(aset.base, "generation_config", None)
        eos = getattr(config, "eos_token_id", None)
        eos = tok.eos_token_id if eos is None else eos
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.decoder = Decoder(aset.model, eos_ids=self.eos_ids, pad_id=tok.pad_token_id or 0,
                               detokenize=self.text)
        # the bare base takes prompts up to its context (an adapter's encoder cuts at the adapter's max_length)
        context = next((v for k in ("max_position_embeddings", "n_positions")
                        if isinstance(v := getattr(aset.base.config, k, None), int) and v > 0), 2048)
        self._plain = TemplateEncoder(Template.parse("{text}"), tok, max_length=context)

    def text(self, tokens: Sequence[int]) -> str:
        return self.set.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def adapters(self) -> list[str]:
        """The set's adapters that answer by generating (the bare base generates too: adapter None)."""
        return [n for n in self.set.names if self.set._members[n].kind.generates]

    def encode(self, adapter: str | None, prompt: str) -> tuple[list[int], list[int], int]:
        """(input ids, virtual index, member index) of a prompt for ``adapter`` (None: the bare base)."""
        if not isinstance(prompt, str) or not prompt:
            raise DataError(f"a prompt must be non-empty text, got {prompt!r}")
        if adapter is None:
            enc = self._plain.encode({"text": prompt})
            return enc.input_ids, enc.virtual_index, -1
        if adapter not in self.set:
            raise ConfigError(f"unknown adapter {adapter!r}; this set holds {self.set.names}")
        m = self.set._members[adapter]
        if not m.kind.generates:
            raise ConfigError(f"adapter {adapter!r} has a {m.spec.head.kind} head, which labels its inputs rather "
                              "than generating: score it with predict")
        enc = m.encoder.encode({m.task.text_fields[0]: prompt})
        return enc.input_ids, enc.virtual_index, self.set.names.index(adapter)

    def add(self, adapter: str | None, prompt: str, sampling: Sampling = Sampling()) -> Row:
        """Queue one request; it joins the running batch at the next :meth:`step`."""
        ids, vindex, member = self.encode(adapter, prompt)
        return self.decoder.add(ids, vindex, member=member, sampling=sampling)

    def step(self) -> list[tuple[Row, int]]:
        return self.decoder.step()

    def generate(self, requests: Sequence[Mapping[str, Any]]) -> list[str]:
        """Each request ``{"adapter": name or None, "prompt": text, "max_new_tokens"?, "temperature"?,
        "top_p"?, "seed"?, "stop"?}`` decoded to the end, all in one running batch; the texts in order."""
        keys = {"adapter", "prompt"} | {"max_new_tokens", "temperature", "top_p", "seed", "stop"}
        rows = []
        for i, r in enumerate(requests):
            unknown = set(r) - keys
            if unknown:
                raise ConfigError(f"request {i + 1}: unknown fields {sorted(unknown)}; known: {sorted(keys)}")
            sampling = Sampling(**{k: (tuple(v) if k == "stop" else v) for k, v in r.items()
                                   if k not in ("adapter", "prompt")})
            rows.append(self.add(r.get("adapter"), r.get("prompt"), sampling))
        while any(not r.done for r in rows):
            self.step()
        return [self.finished_text(r) for r in rows]

    def finished_text(self, row: Row) -> str:
        """A row's text: without its end-of-sequence token, cut before the first stop string it holds."""
        text = self.text([t for t in row.tokens if t not in self.eos_ids])
        cuts = [text.index(s) for s in row.sampling.stop if s in text]
        return text[:min(cuts)] if cuts else text
