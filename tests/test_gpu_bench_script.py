"""bench/gpu_memory_and_steps.py runs where no GPU is (a tiny config on the CPU), so the script is
tested on every CI run, not only on a machine with a GPU; its memory figures are exact on fp32."""

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).parent.parent / "bench" / "gpu_memory_and_steps.py"


def test_gpu_bench_script_on_a_tiny_cpu_model(tmp_path, monkeypatch, capsys):
    out = tmp_path / "gpu.json"
    argv = ["--models", "tiny", "--device", "cpu", "--steps", "1", "--batch-size", "2", "--seq-len", "16",
            "--json", str(out)]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *argv])
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "backward truncation: top layers.2-3" in capsys.readouterr().out
    result = json.loads(out.read_text())["results"]["tiny"]
    deca, full = result["deca"]["rows"], result["full"]["rows"]
    assert [r["block"] for r in deca] == ["layers.0-1", "layers.2-3", "embed"]
    # fp32 on the CPU: the weights are the masters, so 4 B of gradient + 8 B of Adam moments per parameter
    assert all(r["opt_grad_bytes"] == 12 * r["params"] for r in deca + full)
    assert full[0]["params"] == result["full"]["model_params"]
