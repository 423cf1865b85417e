"""Presets: YAML files of run-config values, by path or by name under conf/ or conf/experiments/."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from deca_flower.config_checks import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

PRESET_SUFFIXES = (".yaml", ".yml")


def load_preset(preset: str, known_fields: list[str]) -> Any:
    """A preset is a YAML file: a path, or a name under conf/ or conf/experiments/.

    Only .yaml/.yml files are read, and no error quotes the file (a preset pointing at another file
    must not print it): YAML errors give the position, unknown keys are named only when they are close
    to a config key."""
    candidates = [Path(preset).expanduser()]
    for folder in (CONF_DIR, CONF_DIR / "experiments", Path.cwd() / "conf"):
        candidates += [folder / f"{preset}.yaml", folder / preset]
    found = [path for path in candidates if path.is_file()]
    path = next((p for p in found if p.suffix in PRESET_SUFFIXES), None)
    if path is None:
        if found:
            raise ConfigError(f"preset '{preset}' is not a YAML file (a preset ends in .yaml or .yml)")
        raise ConfigError(f"preset '{preset}' not found (looked in {CONF_DIR} and its experiments/)")
    try:
        node = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"preset {path} is not valid YAML{where}") from None
    except Exception:  # omegaconf refuses a YAML scalar or a key of an unsupported type
        raise ConfigError(f"preset {path} is not a YAML mapping of config keys") from None
    if not isinstance(node, DictConfig):
        raise ConfigError(f"preset {path} is not a YAML mapping of config keys")
    known = [name.replace("_", "-") for name in known_fields]
    unknown = [str(k) for k in node if str(k).replace("_", "-") not in known]
    if unknown:  # named only when close to a config key: the likely typo, not whatever the file holds
        named = {k: close[0] for k in unknown if (close := difflib.get_close_matches(k.replace("_", "-"), known, 1))}
        shown = [f"'{k}' (did you mean '{guess}'?)" for k, guess in named.items()]
        if len(named) < len(unknown):
            shown.append(f"{len(unknown) - len(named)} not shown (not close to a config key)")
        raise ConfigError(f"preset {path} has unknown keys: {', '.join(shown)}")
    return OmegaConf.create({str(k).replace("-", "_"): v for k, v in node.items()})


