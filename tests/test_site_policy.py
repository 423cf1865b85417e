"""A site's own node-config decides what it requires of a run and what of its data leaves it; the
run config (the coordinator's) cannot ask for less."""

import json

import pytest

from deca_flower.flower.site_policy import SitePolicy, SitePolicyError, app_version
from deca_flower.flower.transport import CoordinationError
from deca_flower.secure import write_demo_identities
from tests.test_bad_input import started_coordinator


def node_configs(num_nodes, **site_1):
    configs = {pid: {"partition-id": pid, "num-partitions": num_nodes} for pid in range(num_nodes)}
    configs[1].update(site_1)
    return configs


@pytest.fixture
def cfg(tiny_cfg):
    return tiny_cfg.replace(num_nodes=3, topology="complete")


@pytest.mark.parametrize(("site", "run", "refusal"), [
    ({"require-secure-gossip": True}, {}, "node 1 refuses this run: the site requires secure-gossip=true"),
    ({"share-samples": False}, {"task": "instruct", "dataset": "chatterbot-english", "samples": 2},
     "node 1 refuses this run: the site does not share generated samples .*set samples=0, not 2"),
    ({"accept-app-version": "0.0.1, 0.0.2"}, {},
     rf"node 1 refuses this run: the site accepts deca-flower \['0.0.1', '0.0.2'\] .*this app is {app_version()}"),
    ({"share-label-counts": "maybe"}, {}, "node-config share-label-counts must be true or false, got 'maybe'"),
], ids=["secure-gossip off", "samples on", "another app version", "malformed node-config"])
def test_a_run_that_asks_for_less_than_the_site_requires_is_refused_by_its_node(cfg, tmp_path, site, run, refusal):
    with pytest.raises(CoordinationError, match=refusal):
        started_coordinator(cfg.replace(**run), tmp_path, node_configs=node_configs(3, **site))


def test_a_site_uses_only_its_own_trusted_keys(cfg, tmp_path):
    keys = write_demo_identities(3, tmp_path / "keys")
    other = write_demo_identities(3, tmp_path / "other")  # e.g. a relay's own identities
    secure = cfg.replace(secure_gossip=True, trusted_keys=str(other / "trusted.json"), identity_key_dir=str(keys))
    site = {"trusted-keys": str(keys / "trusted.json")}
    with pytest.raises(CoordinationError, match=r"node 1 refuses this run: the run's trusted-keys .*other.* hold other keys "
                                                r"than the site's own"):
        started_coordinator(secure, tmp_path, node_configs=node_configs(3, **site))
    # the same keys: the node takes part, and keeps using its own file
    coordinator, grid = started_coordinator(secure.replace(trusted_keys=str(keys / "trusted.json"), run_name="same"),
                                            tmp_path, node_configs=node_configs(3, **site))
    coordinator.exchange(block=1, start=True)
    coordinator.exchange(block=1, start=False)


def test_policy_defaults_keep_a_sites_own_data_home():
    assert SitePolicy.from_node_config({"data-path": "site.jsonl"}) == SitePolicy(share_samples=False,
                                                                                  share_label_counts=False)
    assert SitePolicy.from_node_config({}) == SitePolicy()
    explicit = SitePolicy.from_node_config({"data-path": "site.jsonl", "share-samples": "true"})
    assert explicit.share_samples and not explicit.share_label_counts
    with pytest.raises(SitePolicyError, match="require-secure-gossip must be true or false"):
        SitePolicy.from_node_config({"require-secure-gossip": 1})


def test_samples_and_label_counts_of_a_sites_own_file_stay_on_the_site(cfg, tmp_path):
    rows = [{"instruction": f"Patient {i:04d} asks: how is my heart?", "response": f"Patient {i:04d}, all is well."}
            for i in range(40)]
    site_file = tmp_path / "site1.jsonl"
    site_file.write_text("\n".join(json.dumps(r) for r in rows))
    instruct = cfg.replace(task="instruct", dataset="chatterbot-english", samples=2, max_response_tokens=8)
    coordinator, _ = started_coordinator(instruct, tmp_path, node_configs=node_configs(3, **{"data-path": str(site_file)}))
    coordinator.evaluate([0, 1, 2], 0, 0, final=True)
    sent = (coordinator.writer.run_dir / "samples.md").read_text()
    assert "## node 0" in sent and "## node 2" in sent and "## node 1" not in sent and "Patient" not in sent
    kept = (tmp_path / "nodes" / "node_001" / "samples.md").read_text()  # the site's own folder
    assert kept.count("Patient") >= 2
