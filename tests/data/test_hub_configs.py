"""Datasets named by configuration (``glue:sst2``, a task YAML's dataset / config / splits), tested offline:
a local folder of ``save_to_disk`` folders, one per configuration, and a stand-in for ``load_dataset``."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ptune.data import Task, load_records
from ptune.engine import TrainConfig, train
from ptune.engine.build import load_task
from ptune.errors import ConfigError, DataError

TASKS_DIR = Path(__file__).resolve().parents[2] / "configs" / "tasks"
SHIPPED = sorted(TASKS_DIR.glob("*.yaml"))
SST2 = Task(name="sst2", text_fields=("sentence",), labels=("negative", "positive"))
SENTENCES = ["a gripping , funny film", "dull and far too long", "the cast is wonderful", "a tired , lifeless plot"]


def sst2_like(labels=(1, 0, 1, 0)):
    import datasets

    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive"]),
                                  "idx": datasets.Value("int32")})
    return datasets.Dataset.from_dict({"sentence": SENTENCES, "label": list(labels), "idx": list(range(4))},
                                      features=features)


@pytest.fixture()
def glue_folder(tmp_path):
    """``glue/sst2`` saved as GLUE ships it: test labels hidden (-1)."""
    import datasets

    root = tmp_path / "glue"
    datasets.DatasetDict({"train": sst2_like(), "validation": sst2_like((0, 0, 1, 1)),
                          "test": sst2_like((-1, -1, -1, -1))}).save_to_disk(str(root / "sst2"))
    return root


def test_local_folder_by_configuration(glue_folder):
    train = load_records(f"{glue_folder}:sst2", split="train", task=SST2)
    assert [r["label"] for r in train] == ["positive", "negative", "positive", "negative"]  # class names, not ids
    assert train[0] == {"sentence": SENTENCES[0], "label": "positive", "idx": 0}
    val = load_records(f"{glue_folder}:sst2:validation", split="train", task=SST2)  # the source's split wins
    assert [r["label"] for r in val] == ["negative", "negative", "positive", "positive"]
    with pytest.raises(DataError, match=r"every label is hidden .*splits: \{test: validation\}"):
        load_records(f"{glue_folder}:sst2", split="test", task=SST2)
    with pytest.raises(DataError, match=r"has no configuration folder 'mrpc' \(it holds \['sst2'\]\)"):
        load_records(f"{glue_folder}:mrpc", split="train", task=SST2)
    with pytest.raises(DataError, match=r"holds splits \['test', 'train', 'validation'\]"):
        load_records(f"{glue_folder}:sst2:dev", task=SST2)
    with pytest.raises(DataError, match="name the split to load"):
        load_records(f"{glue_folder}:sst2")
    with pytest.raises(DataError, match="dataset folder ./nowhere does not exist"):
        load_records("./nowhere:sst2", split="train")
    with pytest.raises(DataError, match="DATASET:CONFIG:SPLIT"):
        load_records("glue:sst2:train:extra", split="train")


def test_numeric_labels_stay_numbers_for_a_task_that_names_them(glue_folder):
    ids = Task(name="ids", text_fields=("sentence",), labels=("0", "1"))
    assert [r["label"] for r in load_records(f"{glue_folder}:sst2", split="train", task=ids)] == ["1", "0", "1", "0"]


def test_hub_name_config_and_split_reach_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return sst2_like()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_records("glue:sst2", split="validation", task=SST2)
    assert rows[1] == {"sentence": SENTENCES[1], "label": "negative", "idx": 1}
    load_records("glue:sst2:train", split="test", task=SST2)
    load_records("imdb::unsupervised", split="train")
    load_records("some-user/plain", split="validation")  # no config: as before
    assert calls == [("glue", "sst2", "validation"), ("glue", "sst2", "train"), ("imdb", None, "unsupervised"),
                     ("some-user/plain", None, "validation")]


def test_offline_hub_config_fails_in_one_line(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as e:
        load_records("no-such-user/no-such-dataset-xyz:cfg", split="train")
    message = str(e.value)
    assert "\n" not in message
    assert "'no-such-user/no-such-dataset-xyz' configuration 'cfg' split 'train'" in message
    assert message.endswith("offline, pass a local file")


def test_task_yaml_data_source_is_checked():
    with pytest.raises(ConfigError, match="config='sst2' names a configuration of no dataset"):
        Task(name="x", labels=("a", "b"), config="sst2")
    with pytest.raises(ConfigError, match=r"splits has unknown key\(s\) \['dev'\]"):
        Task(name="x", labels=("a", "b"), dataset="glue", splits={"dev": "validation"})
    with pytest.raises(ConfigError, match="splits maps the splits of no dataset"):
        Task(name="x", labels=("a", "b"), splits={"test": "validation"})
    t = Task(name="x", labels=("a", "b"), dataset="glue", config="sst2", splits={"test": "validation"})
    assert t.data_splits() == {"train": "train", "validation": "validation", "test": "validation"}
    assert Task.from_dict(t.to_dict()).to_dict() == t.to_dict()  # saved with the spec, read back unchanged


def local_copy(yaml_path: Path, root: Path, tmp_path: Path) -> tuple[Task, Path]:
    """The shipped task YAML with its dataset pointed at ``root`` (its configuration saved there), the
    configuration's folder holding a few records with the task's columns (ids for the labels, as the hub has)."""
    import datasets

    task = Task.from_yaml(yaml_path)
    n = 2 * len(task.labels)
    columns = {f: [f"{f} number {i} reads well ." for i in range(n)] for f in task.text_fields}
    features = {f: datasets.Value("string") for f in task.text_fields}
    columns.update(label=[i % len(task.labels) for i in range(n)], idx=list(range(n)))
    features.update(label=datasets.ClassLabel(names=list(task.labels)), idx=datasets.Value("int32"))
    ds = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    hidden = ds.map(lambda r: {"label": -1})
    datasets.DatasetDict({"train": ds, "validation": ds, "test": hidden}).save_to_disk(str(root / task.config))
    values = yaml.safe_load(yaml_path.read_text())
    values["dataset"] = str(root)
    local = tmp_path / yaml_path.name
    local.write_text(yaml.safe_dump(values))
    return task, local


def test_shipped_tasks():
    assert [p.stem for p in SHIPPED] == ["boolq", "mrpc", "rte", "sst2"]
    hub = {p.stem: (t.dataset, t.config) for p in SHIPPED for t in [Task.from_yaml(p)]}
    assert hub == {"boolq": ("aps/super_glue", "boolq"), "mrpc": ("nyu-mll/glue", "mrpc"),
                   "rte": ("nyu-mll/glue", "rte"), "sst2": ("nyu-mll/glue", "sst2")}


@pytest.mark.parametrize("yaml_path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_task_yaml_loads_its_dataset(yaml_path, tmp_path, tokenizer):
    """Every shipped task parses, names its data alone (no data file given), and its templates, fields and
    label words fit records with its dataset's columns, for a classification and a verbalizer head."""
    from ptune.templates import Template, TemplateEncoder

    task, local = local_copy(yaml_path, tmp_path / "hub", tmp_path)
    assert task.labels and task.label_words and task.metric == "accuracy" and task.splits["test"] == "validation"
    for head in ("classification", "verbalizer"):
        loaded, splits = load_task(TrainConfig(task=str(local), model="minilm", head=head), tokenizer,
                                   encoder_model=True)
        assert loaded.labels == task.labels  # no label word collides
        assert sorted(splits) == ["test", "train", "validation"]
        assert [r[task.label_field] for r in splits["test"]] == [task.labels[i % len(task.labels)]
                                                                for i in range(len(splits["test"]))]
        template = loaded.template if head == "classification" else loaded.verbalizer_template
        if template:
            enc = TemplateEncoder(Template.parse(template), tokenizer, max_length=task.max_length)
            ids = enc.encode(splits["train"][0]).input_ids
            assert tokenizer.decode(ids).count("number 0") == len(task.text_fields)


def test_task_yaml_alone_trains(tmp_path, tiny_model_dir):
    """``--task sst2.yaml`` with no data file trains on the dataset the YAML names (here a local folder)."""
    _, local = local_copy(TASKS_DIR / "sst2.yaml", tmp_path / "hub", tmp_path)
    summary = train(TrainConfig(task=str(local), model=tiny_model_dir, method="p_tuning", epochs=1, batch_size=2,
                                progress=False, precision="fp32", output_dir=str(tmp_path / "run")))
    assert summary["steps"] == 2 and "accuracy" in summary["test"]
    given = dataclasses.replace(TrainConfig(task=str(local), model=tiny_model_dir), train_file=f"{tmp_path}/hub:sst2")
    _, splits = load_task(given)  # a data file replaces the YAML's dataset whole: only train is there
    assert sorted(splits) == ["train"]
