"""docs/configuration.md, generated from DecaConfig's fields, their docstrings and the allowed
values of the choice fields (config_checks.CHOICES).

    python -m deca_flower.config_docs > docs/configuration.md     (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import ast
import inspect
import re
from dataclasses import MISSING, Field, fields

from deca_flower.config import DecaConfig
from deca_flower.config_checks import CHOICES

PIPE = "\\|"  # a | inside a table cell, escaped

HEADER = """# Configuration

Every key below is a field of `deca_flower/config.py::DecaConfig`, listed in `[tool.flwr.app.config]`
of pyproject.toml with the same default. Set it with `--run-config` (Flower's syntax: strings in
single quotes), in a preset (`preset='quick'` loads `conf/quick.yaml`) or in an experiment file
(`conf/experiments/*.yaml`); an explicit `--run-config` value wins over the preset. Bad values are
reported all at once, before any model is loaded or any node connects.

    flwr run . --stream --run-config "num-nodes=8 topology='ring' bma='none'" --federation-config "num-supernodes=8"

A SuperNode's own settings are not run config but `--node-config` of `deca-flower-supernode`
([deployment.md](deployment.md)): `partition-id` (required: the node's place in the graph and, without
`data-path`, its share of the demo split), `data-path` (the site's own `.jsonl`/`.csv`, read only by
that node) and `identity-key` (its Ed25519 key for `secure-gossip`). The node count is `num-nodes`.

The update rule behind `bma`, `discrepancy`, `bma-strength`, `bma-beta1` and `bma-beta2` is in
[algorithm.md](algorithm.md).

This page is generated: `python -m deca_flower.config_docs > docs/configuration.md`.

| key | type | default | what it sets |
|---|---|---|---|"""


def field_docs() -> dict[str, str]:
    """Field name -> the docstring written under it in the class body."""
    tree = ast.parse(inspect.getsource(DecaConfig))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _default(f: Field) -> str:
    if f.default is MISSING:
        return ""
    return f"`{str(f.default).lower()}`" if isinstance(f.default, bool) else f"`{f.default!r}`"


def configuration_markdown() -> str:
    docs = field_docs()
    missing = [f.name for f in fields(DecaConfig) if f.name not in docs]
    if missing:
        raise ValueError(f"DecaConfig fields without a docstring: {missing}")
    rows = []
    for f in fields(DecaConfig):
        text = docs[f.name]
        if f.name in CHOICES and not all(re.search(rf"\b{re.escape(v)}\b", text) for v in CHOICES[f.name]):
            text += " One of " + ", ".join(f"`{value}`" for value in CHOICES[f.name]) + "."
        rows.append(f"| `{f.name.replace('_', '-')}` | {f.type} | {_default(f)} | {text.replace('|', PIPE)} |")
    return "\n".join([HEADER, *rows, ""])


if __name__ == "__main__":
    print(configuration_markdown(), end="")
