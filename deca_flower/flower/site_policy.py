"""What a site requires of every run, from its OWN node-config, enforced by its node.

The run config comes from the coordinator (the party secure-gossip protects against), so a site
that needs encryption, its own list of trusted keys, its data kept home or one app version says
so when it starts its SuperNode, and its node refuses a run that asks for less:

    flower-supernode ... --node-config "partition-id=0 data-path='site.jsonl' require-secure-gossip=true
        trusted-keys='/etc/site/trusted.json' identity-key='/etc/site/node_0.pem' accept-app-version='0.4.0'"

    require-secure-gossip  refuse a run with secure-gossip=false
    trusted-keys           the only trusted-keys file the node uses; a run that names another file with
                           other keys is refused
    share-samples          send generated answers to held-out prompts to the coordinator (default:
                           false with data-path, else true); false: they go to the node's own folder
    share-label-counts     report per-class counts of the node's training data (same default)
    accept-app-version     comma-separated deca-flower versions the node runs ("" = any)

These checks run in the app the SuperNode executes: they bind an app the site trusts. Flower's
own `flower-supernode --trusted-entities` makes the SuperNode run only a FAB signed by a trusted
entity (docs/security.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from deca_flower.config import DecaConfig

_DEFAULTS = {key: DecaConfig.__dataclass_fields__[key.replace("-", "_")].default
             for key in ("secure-gossip", "trusted-keys", "task", "samples")}


class SitePolicyError(ValueError):
    """The run config asks for less than the site's node-config requires, or the node-config is malformed."""


def app_version() -> str:
    try:
        return version("deca-flower")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def _flag(node_config: Mapping[str, Any], key: str, default: bool) -> bool:
    value = node_config.get(key, default)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise SitePolicyError(f"node-config {key} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class SitePolicy:
    require_secure_gossip: bool = False
    trusted_keys: str = ""
    share_samples: bool = True
    share_label_counts: bool = True
    accept_app_version: str = ""
    samples_forbidden: bool = False  # share-samples=false was said, not only implied by data-path

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SitePolicy:
        own_data = bool(node_config.get("data-path"))  # a site's own file: nothing of it leaves by default
        return cls(require_secure_gossip=_flag(node_config, "require-secure-gossip", False),
                   trusted_keys=str(node_config.get("trusted-keys", "")),
                   share_samples=_flag(node_config, "share-samples", not own_data),
                   share_label_counts=_flag(node_config, "share-label-counts", not own_data),
                   accept_app_version=str(node_config.get("accept-app-version", "")),
                   samples_forbidden="share-samples" in node_config and not _flag(node_config, "share-samples", True))

    def refusals(self, run_config: Mapping[str, Any]) -> list[str]:
        """Why this site refuses a run with `run_config` (Flower's hyphenated keys; empty: it takes part)."""
        cfg = {key: run_config.get(key, default) for key, default in _DEFAULTS.items()}
        out = []
        if self.require_secure_gossip and cfg["secure-gossip"] is not True:
            out.append("the site requires secure-gossip=true (node-config require-secure-gossip)")
        if self.trusted_keys and cfg["secure-gossip"] is True \
                and _keys(str(cfg["trusted-keys"])) not in (None, _keys(self.trusted_keys)):
            out.append(f"the run's trusted-keys '{cfg['trusted-keys']}' hold other keys than the site's own "
                       f"'{self.trusted_keys}' (node-config trusted-keys)")
        if self.samples_forbidden and cfg["task"] == "instruct" and cfg["samples"] != 0:
            out.append(f"the site does not share generated samples (node-config share-samples=false): set samples=0, "
                       f"not {cfg['samples']}")
        accepted = [v.strip() for v in self.accept_app_version.split(",") if v.strip()]
        if accepted and app_version() not in accepted:
            out.append(f"the site accepts deca-flower {accepted} (node-config accept-app-version), this app is "
                       f"{app_version()}")
        return out

    def run_config_for_site(self, run_config: Mapping[str, Any], partition_id: int) -> dict[str, Any]:
        """The run config this node takes part with (its own trusted-keys file), or SitePolicyError."""
        problems = self.refusals(run_config)
        if problems:
            raise SitePolicyError(f"node {partition_id} refuses this run: " + "; ".join(problems))
        return {**run_config, "trusted-keys": self.trusted_keys} if self.trusted_keys else dict(run_config)


def _keys(path: str) -> dict | None:
    """The trusted keys in `path`; None when the node cannot read that file (then only its own list counts)."""
    file = Path(path).expanduser()
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except ValueError as err:
        raise SitePolicyError(f"trusted-keys file {file} is not JSON: {err}") from None
