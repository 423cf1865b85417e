"""The docs stay true to the code: docs/configuration.md is generated from DecaConfig (a field
added, renamed or re-documented without regenerating the page fails here), every relative link
leads to a file, and the run configs of the README's commands are valid."""

import re
from pathlib import Path

from deca_flower.config import DecaConfig
from deca_flower.config_docs import configuration_markdown
from deca_flower.flower.internals import parse_run_config

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "configuration.md"


def test_configuration_page_is_current():
    assert PAGE.read_text() == configuration_markdown(), (
        "docs/configuration.md is out of date: python -m deca_flower.config_docs > docs/configuration.md")


def test_every_choice_field_lists_its_allowed_values():
    text = configuration_markdown()
    topology = next(line for line in text.splitlines() if line.startswith("| `topology` |"))
    assert "One of `ring`, `erdos_renyi`" in topology


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "RESULTS.md",
        *sorted((ROOT / "results").glob("*/README.md"))]


def test_every_relative_link_in_the_docs_leads_somewhere():
    broken = []
    for page in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)


def test_the_run_configs_in_the_readmes_commands_are_valid():
    """Every `--run-config "..."` in a shell block of README.md is a valid DecaConfig (keys, types, values)."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    overrides = [text for block in blocks for text in re.findall(r'--run-config "([^"]*)"', block)]
    assert overrides
    for text in overrides:
        DecaConfig.from_run_config(parse_run_config(text))
