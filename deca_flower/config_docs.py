"""docs/configuration.md, generated from DecaConfig's fields and their docstrings.

    python -m deca_flower.config_docs > docs/configuration.md     (tests/test_docs.py checks it is current)
"""

from __future__ import annotations

import ast
import inspect
from dataclasses import MISSING, fields

from deca_flower.config import DecaConfig

HEADER = """# Configuration

Every key below is a field of `deca_flower/config.py::DecaConfig`, listed in `[tool.flwr.app.config]`
of pyproject.toml with the same default, and can be overridden with `--run-config` (Flower's
syntax: strings in single quotes), in a preset (`preset='quick'` loads `conf/quick.yaml`), or in an
experiment file. Bad values are reported all at once, before any model is loaded or node connects.

    flwr run . --stream --run-config "num-nodes=8 topology='ring' bma='none'"

This page is generated: `python -m deca_flower.config_docs > docs/configuration.md`.

| key | default | what it sets |
|---|---|---|"""


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


def configuration_markdown() -> str:
    docs = field_docs()
    missing = [f.name for f in fields(DecaConfig) if f.name not in docs]
    if missing:
        raise ValueError(f"DecaConfig fields without a docstring: {missing}")
    rows = []
    for f in fields(DecaConfig):
        default = "" if f.default is MISSING else f.default
        shown = f"`{str(default).lower()}`" if isinstance(default, bool) else f"`{default!r}`"
        rows.append(f"| `{f.name.replace('_', '-')}` | {shown} | {docs[f.name].replace('|', '/')} |")
    return "\n".join([HEADER, *rows, ""])


if __name__ == "__main__":
    print(configuration_markdown(), end="")
