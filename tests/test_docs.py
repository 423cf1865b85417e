"""docs/configuration.md is generated from DecaConfig; a field added, renamed or re-documented
without regenerating the page fails here."""

from pathlib import Path

from deca_flower.config_docs import configuration_markdown

PAGE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def test_configuration_page_is_current():
    assert PAGE.read_text() == configuration_markdown(), (
        "docs/configuration.md is out of date: python -m deca_flower.config_docs > docs/configuration.md")


def test_every_choice_field_lists_its_allowed_values():
    text = configuration_markdown()
    topology = next(line for line in text.splitlines() if line.startswith("| `topology` |"))
    assert "One of `ring`, `erdos_renyi`" in topology
