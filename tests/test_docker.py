"""docker/compose.yaml parses and every flag it passes exists in the installed Flower's CLIs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_compose_commands_use_flags_of_the_pinned_flower():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    services = compose["services"]
    assert {"superlink", "supernode-0", "supernode-1", "supernode-2"} <= set(services)
    helps = {}
    for name, service in services.items():
        command = service["command"]
        program = command[0]
        if program not in helps:
            helps[program] = subprocess.run([BIN / program, "--help"], capture_output=True, text=True).stdout
        for flag in (c for c in command if c.startswith("--")):
            assert re.search(rf"\s{re.escape(flag)}[\s,=]", helps[program]), f"{name}: {program} has no {flag}"
    partitions = sorted(s["command"][s["command"].index("--node-config") + 1] for n, s in services.items()
                        if n.startswith("supernode"))
    assert partitions == [f"partition-id={i} num-partitions=3" for i in range(3)]


def test_compose_file_validates_with_the_compose_cli():
    import shutil

    cli = shutil.which("docker-compose")
    if cli is None:
        pytest.skip("no docker-compose CLI on this machine")
    result = subprocess.run([cli, "-f", str(ROOT / "docker" / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
