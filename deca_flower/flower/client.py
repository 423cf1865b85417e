"""ClientApp side: the gossip mod (neighbour-only mixing + BMA) and the message handlers.

A `train.deca` message carries the neighbours' half-step blocks of the previous inner step and
an instruction. The mod mixes them into the active block (after validating every one), then the
train handler runs the next local Adam step (or only finishes the block) and replies with the
node's new half-step block. Nothing is ever averaged anywhere but on the node itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from deca_flower.config import DecaConfig
from deca_flower.core.gossip import BlockError, check_block
from deca_flower.flower import records as rk
from deca_flower.flower.state import commit, forget_checkpoints, get_runtime, restore_checkpoint, save_blocks
from deca_flower.runtime import NodeRuntime
from deca_flower.secure import PairwiseChannel, SecurityError

log = logging.getLogger(__name__)

BAD_NEIGHBOUR_BLOCK = 4001
UNFINISHED_BLOCK = 4003


class NodeSetupError(ValueError):
    """The SuperNode's node-config does not say which data partition it holds."""


def partition_id_of(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise NodeSetupError("node-config lacks 'partition-id' (set it with flower-supernode --node-config)")
    return int(context.node_config["partition-id"])


def runtime_for(msg: Message, context: Context) -> NodeRuntime:
    cfg = DecaConfig(**{k.replace("-", "_"): v for k, v in msg.content[rk.CONFIG].items()})
    data_path = context.node_config.get("data-path")  # the site's own file, read by no one else
    return get_runtime(context, cfg, partition_id_of(context), str(data_path) if data_path else None,
                       msg.metadata.message_id)


def secure_channel(runtime: NodeRuntime, context: Context) -> PairwiseChannel:
    """The node's pairwise channel; its per-run key is kept in the node's own context.state."""
    if runtime.channel is None:
        cfg, pid = runtime.cfg, runtime.partition_id
        identity = context.node_config.get("identity-key") or Path(cfg.identity_key_dir) / f"node_{pid}.pem"
        stored = context.state.get(rk.SECURE_STATE)
        runtime.channel = PairwiseChannel.from_files(context.run_id, pid, Path(str(identity)), Path(cfg.trusted_keys),
                                                     bytes.fromhex(stored["x25519"]) if stored else None)
        context.state[rk.SECURE_STATE] = ConfigRecord({"x25519": runtime.channel.ephemeral_bytes.hex()})
    return runtime.channel


def _neighbour_keys(msg: Message, channel: PairwiseChannel) -> list[int]:
    keys = msg.content[rk.KEYS]
    pids = sorted(int(k[4:]) for k in keys if k.startswith("pub."))
    for pid in pids:
        channel.add_neighbour(pid, keys[f"pub.{pid}"], keys[f"sig.{pid}"])
    return pids


def _decode(msg: Message, runtime: NodeRuntime, key: str, record: ArrayRecord, sender: str,
            own: dict) -> dict:
    if not runtime.cfg.secure_gossip:
        return rk.record_to_block(record, sender)
    step = int(msg.content[rk.INSTRUCTION][rk.STEP]) - 1  # halves were sealed at the previous step
    names = list(own)
    opened = runtime.channel.open(int(key[len(rk.NEIGHBOUR_PREFIX):]), step, runtime.node.active_index,
                                  record["ct"].data, [own[n] for n in names])
    return dict(zip(names, opened))


def gossip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mix the neighbours' half-step blocks into the active block, fold BMA, then go on."""
    if msg.metadata.message_type != rk.TRAIN or not msg.content[rk.INSTRUCTION][rk.MIX]:
        return call_next(msg, context)
    runtime = runtime_for(msg, context)
    cfg, node = runtime.cfg, runtime.node
    weights = msg.content[rk.WEIGHTS]
    self_weight, others, senders, excluded = float(weights["self"]), [], [], []
    own = node.block_values()
    if cfg.secure_gossip:
        try:
            _neighbour_keys(msg, secure_channel(runtime, context))
        except SecurityError as err:
            return Message(Error(BAD_NEIGHBOUR_BLOCK, f"node {runtime.partition_id}: {err}"), reply_to=msg)
    for key, record in msg.content.array_records.items():
        if not key.startswith(rk.NEIGHBOUR_PREFIX):
            continue
        sender = f"node {key[len(rk.NEIGHBOUR_PREFIX):]}"
        try:
            block = _decode(msg, runtime, key, record, sender, own)
            check_block(block, own, sender, cfg.max_block_deviation)
        except (BlockError, rk.RecordError, SecurityError) as err:
            log.error("node %d rejected a neighbour block: %s", runtime.partition_id, err)
            if cfg.on_bad_block == "stop":
                return Message(Error(BAD_NEIGHBOUR_BLOCK, f"node {runtime.partition_id}: {err}"), reply_to=msg)
            self_weight += float(weights[key])  # re-normalise: the excluded share stays with the node
            excluded.append(f"{sender}: {err}")
            continue
        others.append((float(weights[key]), block))
        senders.append(sender)
    try:
        node.apply_mix(self_weight, others, senders, validated=True)
    except (BlockError, ValueError) as err:
        return Message(Error(BAD_NEIGHBOUR_BLOCK, f"node {runtime.partition_id}: {err}"), reply_to=msg)
    runtime.excluded_last_step = excluded
    return call_next(msg, context)


def handle_query(msg: Message, context: Context) -> Message:
    """Load model and data now (so the first train step is not slowed) and say who we are.

    The instruction may also ask to resume from a checkpoint, to send some blocks (for a
    neighbour that rejoins), or carry those blocks to a node that rejoins."""
    start = time.time()
    runtime = runtime_for(msg, context)
    ask = msg.content[rk.INSTRUCTION] if rk.INSTRUCTION in msg.content else ConfigRecord()
    content = RecordDict()
    if ask.get(rk.FRESH):
        forget_checkpoints(runtime)
    if rk.RESUME_VISIT in ask:
        restore_checkpoint(runtime, int(ask[rk.RESUME_VISIT]))
        commit(context, runtime, msg.metadata.message_id)
    if rk.SEND_BLOCKS in ask:
        content[rk.BLOCKS] = rk.block_to_record(
            {name: t for b in ask[rk.SEND_BLOCKS] for name, t in runtime.node.stored_block(int(b)).items()})
    if rk.BLOCKS in msg.content:
        try:
            _take_blocks(runtime, context, msg.content[rk.BLOCKS], int(ask[rk.VISIT]), msg.metadata.message_id)
        except (BlockError, rk.RecordError) as err:
            return Message(Error(BAD_NEIGHBOUR_BLOCK, f"node {runtime.partition_id} cannot rejoin: {err}"), reply_to=msg)
    content[rk.NODE_INFO] = ConfigRecord({
        **({"x25519": secure_channel(runtime, context).public.hex(),
            "signature": runtime.channel.signature.hex()} if runtime.cfg.secure_gossip else {}),
        "partition-id": runtime.partition_id, "device": str(runtime.device),
        "train-examples": len(runtime.train), "label-counts": runtime.label_counts,
        "label-names": runtime.label_names, "own-data": bool(runtime.data_path),
        "num-blocks": len(runtime.blocks), "block-names": [b.name for b in runtime.blocks],
        "steps-per-visit": runtime.steps_per_visit,
        "setup-s": time.time() - start,
    })
    return Message(content, reply_to=msg)


def _take_blocks(runtime: NodeRuntime, context: Context, record: ArrayRecord, visit: int, message_id: str) -> None:
    """Rejoin: drop the unfinished visit and adopt a neighbour's current blocks (checked first)."""
    node = runtime.node
    received = rk.record_to_block(record, "the neighbour of a rejoining node")
    adopted = {}
    for block in node.blocks:
        if any(name in received for name in block.param_names):
            values = {name: received[name] for name in block.param_names if name in received}
            check_block(values, node.stored_block(block.index), f"the neighbour's block {block.index}")
            adopted[block.index] = values
    node.end_block()
    for index, values in adopted.items():
        node.overwrite_block(index, values)
    save_blocks(runtime, adopted, visit)
    commit(context, runtime, message_id)


def handle_train(msg: Message, context: Context) -> Message:
    """Finish the visit of the active block if asked (save it: a block-boundary checkpoint), then
    one local step on `block` unless block=-1."""
    runtime = runtime_for(msg, context)
    node = runtime.node
    instruction = msg.content[rk.INSTRUCTION]
    block, start_visit, finish = int(instruction[rk.BLOCK]), bool(instruction[rk.START]), int(instruction[rk.FINISH])
    if finish >= 0 and node.active_index is not None:  # (a node that just rejoined has nothing to finish)
        finished = {node.active_index: node.block_values()}
        node.end_block()
        # saved while the reply travels, unless the step below changes those weights or another process
        # may restore this node from disk before its next message (state-sync="step")
        background = block >= 0 and block not in finished and runtime.cfg.state_sync == "block"
        save_blocks(runtime, finished, finish, background=background)  # the sampler of the boundary, not after the step
    content = RecordDict()
    if block >= 0:
        if start_visit:
            if node.active_index is not None:
                return Message(Error(UNFINISHED_BLOCK, f"node {runtime.partition_id}: block {node.active_index} "
                                     "was not finished before the next visit"), reply_to=msg)
            node.start_block(block)
        start = time.time()
        loss, half = node.local_step(copy=False)  # packed (or sealed) below: the record is the copy
        if runtime.cfg.secure_gossip:  # one sealed copy per neighbour: the relay cannot read any
            channel = secure_channel(runtime, context)
            step = int(instruction[rk.STEP])
            try:
                receivers = _neighbour_keys(msg, channel)
            except SecurityError as err:
                return Message(Error(BAD_NEIGHBOUR_BLOCK, f"node {runtime.partition_id}: {err}"), reply_to=msg)
            for pid in receivers:
                sealed = channel.seal(pid, step, block, list(half.values()))
                content[f"{rk.SEALED_PREFIX}{pid}"] = ArrayRecord(
                    {"ct": Array(dtype="uint8", shape=(len(sealed),), stype="sealed", data=sealed)})
        else:
            content[rk.HALF] = rk.block_to_record(half)
        content[rk.METRICS] = MetricRecord({"loss": loss, "step-s": time.time() - start,
                                            "opt-bytes": float(node.peak_optimizer_bytes),
                                            "excluded": float(len(runtime.excluded_last_step))})
        if runtime.excluded_last_step:
            content[rk.EXCLUDED] = ConfigRecord({"senders": runtime.excluded_last_step})
            runtime.excluded_last_step = []
    commit(context, runtime, msg.metadata.message_id)
    return Message(content, reply_to=msg)


def handle_evaluate(msg: Message, context: Context) -> Message:
    runtime = runtime_for(msg, context)
    start = time.time()
    metrics = runtime.evaluate()
    metrics["eval-s"] = time.time() - start
    content = RecordDict({rk.METRICS: MetricRecord(metrics)})
    ask = msg.content[rk.INSTRUCTION] if rk.INSTRUCTION in msg.content else ConfigRecord()
    samples = runtime.samples() if ask.get(rk.SAMPLES) else []
    if samples:
        content[rk.SAMPLES] = ConfigRecord({"prompts": [p for p, _ in samples], "answers": [a for _, a in samples]})
    return Message(content, reply_to=msg)
