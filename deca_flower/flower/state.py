"""Where a node's run config, model, moments and position live between messages.

The run config comes with the node's Setup (or RejoinProbe) message: validated once, it is kept
in the node's Flower `context.state` (CONFIG), so that later messages need not carry it and a
process without a warm copy of the node can rebuild it.

Simulation serves many nodes from one long-lived Ray actor process, in any order; a node may
also land on another actor; Flower's stock `flower-supernode` starts a fresh `flwr-clientapp`
process for every message. So:
- warm tier: a process-level cache {(run id, node id): runtime}; each processed message bumps
  a generation counter stored both in the runtime and in the node's Flower `context.state`,
  so a stale or foreign copy is never used;
- disk tier: `<state dir>/node_<partition>/`: every finished block visit as
  `block_<b>.v<visit>.safetensors` and a checkpoint `checkpoint.v<visit>.json` (minibatch RNG
  state); `position.json` (generation, active block, minibatch RNG, the message it answered) and,
  with state-sync="step", `active.g<generation>.safetensors` (active block, Adam moments, whether a
  fold is pending; compressed gossip: the block's public copies, core/choco.py) after every
  message, the older one deleted only once position.json names the new one. A process without a
  warm copy rebuilds the runtime and overlays these. A
  `flwr-clientapp` process keeps nothing warm, so it writes the active block after every message
  whatever state-sync says.

Checkpoints are block-boundary snapshots for `resume=true`. When the finish of a visit rides on
a step of another block (state-sync="block"), the node writes it in a background thread while
the reply travels and the next node computes, and waits for it before it handles its next
message. So the coordinator records a visit as done only after every node answered the message
AFTER the one that finished it, and a node can be two visits ahead of the coordinator's
checkpoint: the three newest versions of each file are kept, and resuming at visit c loads, per
block, the newest version <= c and deletes the versions after c. Files are written under a
temporary name and renamed, so no reader ever sees half a block.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from safetensors.torch import load_file, save_file

from deca_flower.config import DecaConfig
from deca_flower.protocol.messages import CONFIG
from deca_flower.runtime import NodeRuntime, build_runtime

log = logging.getLogger(__name__)

STATE_RECORD = "deca.state"
_VERSIONED = re.compile(r"(block_(\d+)|checkpoint)\.v(\d+)\.(safetensors|json)$")
KEEP_VERSIONS = 3
_WARM: dict[tuple[int, int], NodeRuntime] = {}  # (run id, node id) -> the node, warm in this process
_CONFIGS: dict[tuple[int, int], DecaConfig] = {}  # (run id, node id) -> its run config, validated
_SAVER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deca-save")  # one writer: saves land in order
_saving: Future | None = None  # the newest background save of any node in this process
# Flower's stock SuperNode runs every message in a new process of this name: nothing stays warm
PROCESS_PER_MESSAGE = Path(sys.argv[0]).name == "flwr-clientapp"


class StateLost(RuntimeError):
    """The node's state at the expected generation is neither warm nor on disk."""


def node_dir(cfg: DecaConfig, partition_id: int) -> Path:
    return Path(cfg.state_dir) / f"node_{partition_id:03d}"


def syncs_every_step(cfg: DecaConfig) -> bool:
    """Whether the active block is written after every message (state-sync="step", or a process per message)."""
    return cfg.state_sync == "step" or PROCESS_PER_MESSAGE


def configure(context: Context, run_config: dict) -> DecaConfig:
    """Validate the run config of a Setup or RejoinProbe and keep it in the node's context."""
    context.state[CONFIG] = ConfigRecord(run_config)
    _CONFIGS.pop((context.run_id, context.node_id), None)
    return config_of(context)


def config_of(context: Context) -> DecaConfig:
    """The node's run config, validated once per run in this process."""
    key = (context.run_id, context.node_id)
    if key not in _CONFIGS:
        if CONFIG not in context.state:
            raise StateLost(f"no setup message of run {context.run_id} reached node {context.node_id}")
        _CONFIGS[key] = DecaConfig(**{k.replace("-", "_"): v for k, v in context.state[CONFIG].items()})
    return _CONFIGS[key]


def generation_of(context: Context) -> int:
    record = context.state.get(STATE_RECORD)
    return int(record["generation"]) if record is not None else 0


def get_runtime(context: Context, partition_id: int, data_path: str | None = None, message_id: str = "") -> NodeRuntime:
    """The node's runtime at the generation recorded in its context (warm, or built from the
    config in its context and restored), once every background save of this process has landed.
    `message_id`: the message about to be handled."""
    wait_for_saves()
    key = (context.run_id, context.node_id)
    generation = generation_of(context)
    runtime = _WARM.get(key)
    if runtime is not None and runtime.generation == generation:
        return runtime
    runtime = build_runtime(config_of(context), partition_id, data_path=data_path)
    if generation:
        _restore(runtime, generation, message_id)
    _drop_other_runs(context.run_id)
    _WARM[key] = runtime
    return runtime


def commit(context: Context, runtime: NodeRuntime, message_id: str = "") -> None:
    """Record that message `message_id` was processed: bump the generation and persist the position."""
    runtime.generation += 1
    context.state[STATE_RECORD] = ConfigRecord({"generation": runtime.generation})
    folder = node_dir(runtime.cfg, runtime.partition_id)
    folder.mkdir(parents=True, exist_ok=True)
    node = runtime.node
    mid_block = node.optimizer is not None
    active = _active_file(folder, runtime.generation)
    if syncs_every_step(runtime.cfg) and mid_block:
        tensors = {f"w.{k}": v.cpu() for k, v in node.block_values().items()}
        tensors.update({f"opt.{k}": v.cpu() for k, v in node.optimizer.state_tensors().items()})
        if node.public is not None:
            tensors.update({f"pub.{k}": v.cpu() for k, v in node.public.state_tensors().items()})
        save_file({k: v.contiguous() for k, v in tensors.items()}, active.with_suffix(".tmp"))
        active.with_suffix(".tmp").replace(active)
    position = {"generation": runtime.generation, "active": node.active_index,
                "synced": syncs_every_step(runtime.cfg) or not mid_block,
                "sampler": node.sampler.state(), "message": message_id}
    tmp = folder / "position.json.tmp"
    tmp.write_text(json.dumps(position))
    tmp.replace(folder / "position.json")
    for old in folder.glob("active.g*.safetensors"):  # a crash before the line above leaves the old pair whole
        if old != active:
            old.unlink()


def _active_file(folder: Path, generation: int) -> Path:
    return folder / f"active.g{generation:09d}.safetensors"


def save_blocks(runtime: NodeRuntime, blocks: dict[int, dict[str, torch.Tensor]], visit: int, *,
                background: bool = False) -> None:
    """Write finished blocks as versions of `visit`, then the checkpoint that makes them count.
    background=True: return at once and write in this process's saver thread; the blocks must stay
    unchanged until the node's next message (which waits for the save first)."""
    global _saving
    # the node's only randomness is its minibatch generator (no dropout), so that is the RNG state;
    # taken now, before the step that follows advances it
    checkpoint = {"visit": visit, "sampler": runtime.node.sampler.state()}
    folder = node_dir(runtime.cfg, runtime.partition_id)
    if background:
        _saving = _SAVER.submit(_write_blocks, folder, blocks, checkpoint)
    else:
        wait_for_saves()
        _write_blocks(folder, blocks, checkpoint)


def wait_for_saves() -> None:
    """Block until this process's background saves have landed; re-raise the error of a failed one."""
    global _saving
    saving, _saving = _saving, None
    if saving is not None:
        saving.result()


def _write_blocks(folder: Path, blocks: dict[int, dict[str, torch.Tensor]], checkpoint: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    visit = checkpoint["visit"]
    for index, values in blocks.items():
        file = folder / f"block_{index:03d}.v{visit:05d}.safetensors"
        partial = file.with_suffix(".tmp")
        save_file({k: v.contiguous().cpu() for k, v in values.items()}, partial)
        partial.replace(file)
    tmp = folder / "checkpoint.tmp"
    tmp.write_text(json.dumps(checkpoint))
    tmp.replace(folder / f"checkpoint.v{visit:05d}.json")
    for versions in _versions(folder).values():
        for _, old in versions[:-KEEP_VERSIONS]:
            old.unlink()


def _versions(folder: Path) -> dict[str, list[tuple[int, Path]]]:
    """{"block_003" or "checkpoint": [(visit, file), ...] oldest first}."""
    found: dict[str, list[tuple[int, Path]]] = {}
    for file in folder.glob("*.v*.*"):
        match = _VERSIONED.match(file.name)
        if match:
            found.setdefault(match.group(1), []).append((int(match.group(3)), file))
    return {k: sorted(v) for k, v in found.items()}


def _load_blocks(runtime: NodeRuntime, upto: int | None) -> None:
    """Overlay, per block, the newest saved version (<= upto when given)."""
    params = dict(runtime.node.model.named_parameters())
    for name, versions in _versions(node_dir(runtime.cfg, runtime.partition_id)).items():
        usable = [file for visit, file in versions if upto is None or visit <= upto]
        if name.startswith("block_") and usable:
            with torch.no_grad():
                for param, value in load_file(usable[-1]).items():
                    params[param].copy_(value)


def restore_checkpoint(runtime: NodeRuntime, visit: int) -> None:
    """Put a freshly built node back at the end of block visit `visit` (resume=true)."""
    folder = node_dir(runtime.cfg, runtime.partition_id)
    file = folder / f"checkpoint.v{visit:05d}.json"
    if not file.is_file():
        raise StateLost(f"node {runtime.partition_id}: no checkpoint of visit {visit} under {folder} "
                        f"(found visits {[v for v, _ in _versions(folder).get('checkpoint', [])]})")
    checkpoint = json.loads(file.read_text())
    _load_blocks(runtime, upto=visit)
    runtime.node.sampler.load_state(checkpoint["sampler"])
    forget_checkpoints(runtime, after=visit)  # the abandoned future of the killed run
    log.info("node %d resumed from %s at the end of visit %d", runtime.partition_id, folder, visit)


def forget_checkpoints(runtime: NodeRuntime, after: int | None = None) -> None:
    """Delete saved block versions and checkpoints of visits after `after` (all when None), and
    what a process that died while writing left behind."""
    folder = node_dir(runtime.cfg, runtime.partition_id)
    for versions in _versions(folder).values():
        for visit, path in versions:
            if after is None or visit > after:
                path.unlink()
    for partial in folder.glob("*.tmp"):
        partial.unlink()


def _restore(runtime: NodeRuntime, generation: int, message_id: str) -> None:
    folder = node_dir(runtime.cfg, runtime.partition_id)
    position_file = folder / "position.json"
    position = json.loads(position_file.read_text()) if position_file.is_file() else {}
    # one ahead: the process saved its state, then died before its reply (and the context that
    # rides with it) got out. The coordinator never saw that message, so the disk is the truth.
    if position.get("generation") not in (generation, generation + 1) or not position.get("synced"):
        raise StateLost(
            f"node {runtime.partition_id}: state at generation {generation} is not in this process and "
            f"not on disk under {folder} (on disk: {position.get('generation')}). Several simulation "
            "actors or a restarted process need state-sync='step'.")
    if message_id and position["generation"] == generation + 1 and position.get("message") == message_id:
        raise StateLost(  # its effects are on disk; running it again would apply it twice
            f"node {runtime.partition_id}: message {message_id} was already handled by a process that died "
            f"before replying; its reply is lost. Continue the run with resume=true (last block boundary).")
    _load_blocks(runtime, upto=None)
    params = dict(runtime.node.model.named_parameters())
    runtime.node.sampler.load_state(position["sampler"])
    if position["active"] is not None:
        saved = load_file(_active_file(folder, position["generation"]))
        with torch.no_grad():  # weights first: start_block derives the fp32 masters from them
            for name in runtime.node.blocks[position["active"]].param_names:
                params[name].copy_(saved[f"w.{name}"])
        runtime.node.start_block(position["active"])
        runtime.node.optimizer.load_state_tensors({k[4:]: v for k, v in saved.items() if k.startswith("opt.")})
        if runtime.node.public is not None:
            runtime.node.public.load_state_tensors({k[4:]: v for k, v in saved.items() if k.startswith("pub.")})
    runtime.generation = position["generation"]
    log.info("node %d restored from %s at generation %d (its context: %d)", runtime.partition_id, folder,
             runtime.generation, generation)


def _drop_other_runs(run_id: int) -> None:
    """A new run frees the models that earlier runs left in this process."""
    for cache in (_WARM, _CONFIGS):
        for key in [k for k in cache if k[0] != run_id]:
            del cache[key]
