"""Each site trains on its own local file (node-config data-path); nobody else reads it."""

import json

import pytest
from datasets import ClassLabel, Dataset, Features, Value

from apps.client_app import app as client_app
from deca_flower.data.sources import DataError, load_corpus
from deca_flower.flower import state
from deca_flower.flower.job import run_deca
from deca_flower.flower.transport import CoordinationError
from deca_flower.paths import prepare_run
from deca_flower.runtime import node_data
from tests.inprocess import InProcessGrid

TOPICS = ["sport", "tech", "politics"]


def write_site(path, topics, rows=12):
    lines = [json.dumps({"text": f"{topic} news item number {i} " * 3, "label": topic})
             for i in range(rows) for topic in topics]
    path.write_text("\n".join(lines))
    return str(path)


def sites(tmp_path, topics_per_site):
    return {pid: {"partition-id": pid, "num-partitions": len(topics_per_site),
                  "data-path": write_site(tmp_path / f"site{pid}.jsonl", topics)}
            for pid, topics in enumerate(topics_per_site)}


def run(cfg, node_configs):
    state._WARM.clear()
    cfg, run_dir = prepare_run(cfg)
    return run_deca(InProcessGrid(client_app, cfg.num_nodes, node_configs=node_configs), cfg, run_dir), run_dir


def test_sites_train_on_their_own_files(tiny_cfg, tmp_path):
    configs = sites(tmp_path, [TOPICS, TOPICS[:2], TOPICS[1:], TOPICS[::2]])
    for pid in (1, 2, 3):  # site 0 keeps its label counts home, as a site's own file does by default
        configs[pid]["share-label-counts"] = True
    summary, run_dir = run(tiny_cfg.replace(labels=",".join(TOPICS)), configs)
    counts = summary["label_counts"]  # 80% of each site's 12 rows per topic, only its topics
    assert counts[0] == [] and counts[1][2] == 0 and counts[2][0] == 0 and counts[3][1] == 0
    assert all(sum(counts[pid]) > 0 for pid in (1, 2, 3))
    assert len(summary["final"]["accuracy_per_node"]) == 4
    assert not (run_dir / "label_distribution.png").exists()  # the server never sees the sites' data


def test_sites_that_number_classes_differently_are_refused(tiny_cfg, tmp_path):
    with pytest.raises(CoordinationError, match="nodes disagree on the class names"):
        run(tiny_cfg, sites(tmp_path, [TOPICS, TOPICS[:2], TOPICS[1:], TOPICS[::2]]))


def test_a_label_outside_the_agreed_list_is_refused(tmp_path):
    with pytest.raises(DataError, match=r"labels \['tech'\] that are not in"):
        load_corpus(write_site(tmp_path / "x.jsonl", TOPICS), labels=["sport", "politics"])


def test_a_missing_label_is_refused_not_made_a_class(tmp_path):
    csv = tmp_path / "gap.csv"
    csv.write_text("text,label\nfirst,1\nsecond,\nthird,0\n")  # pandas reads the gap as NaN
    with pytest.raises(DataError, match=r"missing or empty 'label' \(rows \[1\]"):
        load_corpus(str(csv))


def test_a_data_file_edited_between_runs_is_read_again(tmp_path):
    # warm processes (simulation actors, deca-flower-supernode) outlive a run; the split cache must not
    from deca_flower.runtime import split_data

    path = tmp_path / "site.csv"
    path.write_text("text,label\n" + "".join(f"old text {i},{'ab'[i % 2]}\n" for i in range(10)))
    first, _ = split_data(str(path), "classify", 0.2, 0)
    path.write_text("text,label\n" + "".join(f"new text number {i},{'bc'[i % 2]}\n" for i in range(12)))
    second, _ = split_data(str(path), "classify", 0.2, 0)
    assert all(t.startswith("old") for t in first["text"]) and all(t.startswith("new") for t in second["text"])


BBC = ["business", "entertainment", "politics", "sports", "tech"]


def class_names_of(corpus):
    return {text: corpus.features["label"].names[label] for text, label in zip(corpus["text"], corpus["label"])}


def test_labels_set_the_order_of_the_embedded_classes(tiny_cfg):
    default = load_corpus("bbc-news")
    assert default.features["label"].names == BBC and load_corpus("bbc-news", BBC)["label"] == default["label"]
    reordered = load_corpus("bbc-news", BBC[::-1])
    assert reordered.features["label"].names == BBC[::-1]
    assert class_names_of(reordered) == class_names_of(default)  # every article keeps its class
    wider = load_corpus("bbc-news", BBC + ["weather"])  # the data holds a subset of the classes listed
    assert wider.features["label"].names[-1] == "weather" and 5 not in set(wider["label"])
    with pytest.raises(DataError, match=r"labels \['tech'\] that are not in"):
        load_corpus("bbc-news", BBC[:4])
    # what the nodes train on (dataset=, the shared split): the order asked for
    _, _, names = node_data(tiny_cfg.replace(labels=",".join(BBC[::-1])), 0)
    assert names == BBC[::-1]


def test_labels_set_the_order_for_a_shared_local_file_and_a_hub_data_set(tiny_cfg, tmp_path, monkeypatch):
    shared = write_site(tmp_path / "shared.jsonl", TOPICS)
    _, _, names = node_data(tiny_cfg.replace(dataset=shared, labels="tech,sport,politics"), 1)
    assert names == ["tech", "sport", "politics"]
    hub = Dataset.from_dict({"text": ["good", "bad", "fine", "awful"], "label": [1, 0, 1, 0]},
                            features=Features({"text": Value("string"), "label": ClassLabel(names=["neg", "pos"])}))
    monkeypatch.setattr("deca_flower.data.sources.load_dataset", lambda name, split: hub)
    flipped = load_corpus("someone/reviews", ["pos", "neg"])
    assert flipped.features["label"].names == ["pos", "neg"] and flipped["label"] == [0, 1, 0, 1]
    with pytest.raises(DataError, match=r"labels \['pos'\] that are not in labels=\['neg', 'neutral'\]"):
        load_corpus("someone/reviews", ["neg", "neutral"])


def test_fewer_than_two_classes_is_refused(tmp_path):
    one_class = write_site(tmp_path / "one.jsonl", ["sport"])
    with pytest.raises(DataError, match=r"holds 1 class\(es\) \['sport'\]: classification needs at least 2"):
        load_corpus(one_class)
    assert load_corpus(one_class, TOPICS).features["label"].names == TOPICS  # one site's share of listed classes
    with pytest.raises(DataError, match="fewer than 2 classes"):
        load_corpus(one_class, ["sport"])


@pytest.mark.parametrize("content", ["", "\n  \n"], ids=["empty", "blank lines"])
def test_an_empty_data_file_is_named(tmp_path, content):
    from deca_flower.data.instructions import load_instructions

    path = tmp_path / "site.jsonl"
    path.write_text(content)
    for load in (load_corpus, load_instructions):
        with pytest.raises(DataError, match=f"data file {path} is empty"):
            load(str(path))
