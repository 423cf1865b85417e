"""Instruction/response data as a `datasets.Dataset` with columns text (the instruction),
response, and label (ClassLabel: the category the non-IID split is drawn over).

- "chatterbot-english": the embedded offline set, the English Q/A conversations of the PyPI
  package chatterbot-corpus==1.3.3 (data/english/*.yml, one category per file), read from its
  wheel, fetched once with `pip download --no-deps` (its dependencies are not needed) into the
  deca_flower cache. Each consecutive pair of turns is one example; exact repeats are dropped.
- a hub id (e.g. tatsu-lab/alpaca: instruction, input, output) or a local .jsonl/.json/.csv with
  instruction (+ optional input) and response or output columns. The category is the
  `category` column when there is one, else the instruction's first word (the 8 most common,
  the rest "other"), which is what makes an Alpaca split non-IID.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import yaml
from datasets import ClassLabel, Dataset, Features, Value
from filelock import FileLock

from deca_flower.data.sources import DataError, load_table, require_values

CHATTERBOT = "chatterbot-english"
CHATTERBOT_WHEEL = "chatterbot-corpus==1.3.3"
TOP_FIRST_WORDS = 8


def load_instructions(name: str) -> Dataset:
    if name == CHATTERBOT:
        return _chatterbot()
    return _as_instructions(load_table(name), name)


def prepare_chatterbot() -> Path:
    """The chatterbot-corpus wheel in the deca_flower cache (fetched once, without dependencies)."""
    from deca_flower.models import cache_dir

    return _chatterbot_wheel(cache_dir())


def _chatterbot() -> Dataset:
    with zipfile.ZipFile(prepare_chatterbot()) as wheel:
        files = sorted(n for n in wheel.namelist() if "/data/english/" in n and n.endswith(".yml"))
        rows, seen = [], set()
        for member in files:
            category = Path(member).stem
            for turns in yaml.safe_load(wheel.read(member).decode("utf-8")).get("conversations", []):
                turns = [" ".join(str(t).split()) for t in turns]
                for question, answer in zip(turns, turns[1:]):
                    if question and answer and (question, answer) not in seen:
                        seen.add((question, answer))
                        rows.append((question, answer, category))
    if not rows:
        raise DataError(f"no English conversations in the {CHATTERBOT_WHEEL} wheel")
    categories = sorted({c for _, _, c in rows})
    features = Features({"text": Value("string"), "response": Value("string"), "label": ClassLabel(names=categories)})
    return Dataset.from_dict({"text": [q for q, _, _ in rows], "response": [a for _, a, _ in rows],
                              "label": [categories.index(c) for _, _, c in rows]}, features=features)


def _chatterbot_wheel(cache: Path) -> Path:
    found = sorted(cache.glob("chatterbot_corpus-1.3.3-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / "chatterbot.lock")):  # simulation actors start together: one fetches, the rest wait
        found = sorted(cache.glob("chatterbot_corpus-1.3.3-*.whl"))
        if found:
            return found[0]
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(cache), CHATTERBOT_WHEEL]
        result = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(cache.glob("chatterbot_corpus-1.3.3-*.whl"))
        if result.returncode != 0 or not found:
            raise DataError(f"could not fetch {CHATTERBOT_WHEEL} with pip: {result.stderr.strip()[-500:]}")
        return found[0]


def _as_instructions(raw: Dataset, name: str) -> Dataset:
    columns = set(raw.column_names)
    instruction = "instruction" if "instruction" in columns else "text"
    response = next((c for c in ("response", "output") if c in columns), None)
    if instruction not in columns or response is None:
        raise DataError(f"instruction data {name} needs an instruction (or text) column and a response (or output) "
                        f"column; has {raw.column_names}")
    if len(raw) == 0:
        raise DataError(f"data set {name} is empty")
    require_values(raw[instruction], name, instruction)
    require_values(raw[response], name, response)
    extra = raw["input"] if "input" in columns else [""] * len(raw)
    texts = [f"{q}\n{x}".strip() if x else str(q).strip() for q, x in zip(raw[instruction], extra)]
    responses = [str(r).strip() for r in raw[response]]
    if "category" in columns:
        require_values(raw["category"], name, "category")  # a blank cell would become a category "None"
        categories = [str(c) for c in raw["category"]]
    else:
        first = [t.split(maxsplit=1)[0].lower().strip(".,:;!?") for t in texts]  # not a list of every word of a huge row
        common = {w for w, _ in Counter(first).most_common(TOP_FIRST_WORDS)}
        categories = [w if w in common else "other" for w in first]
    names = sorted(set(categories))
    features = Features({"text": Value("string"), "response": Value("string"), "label": ClassLabel(names=names)})
    return Dataset.from_dict({"text": texts, "response": responses, "label": [names.index(c) for c in categories]},
                             features=features)
