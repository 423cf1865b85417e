"""ClientApp side: the gossip mod (neighbour-only mixing + BMA) and one handler per message of
deca_flower.protocol.messages.

A train.step message carries the neighbours' half-step blocks of the previous inner step (with
compressed gossip: their payloads, added to their public copies). The mod mixes them into the
active block (after validating every one), then the step handler runs the next local Adam step
(or only finishes the block) and replies with the node's new half-step block or payload
(exchange.py). Nothing is ever averaged anywhere but on the node itself.
"""

from __future__ import annotations

import functools
import logging
import time
from pathlib import Path

import networkx as nx
from flwr.app import ConfigRecord, Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable

from deca_flower.config import DecaConfig
from deca_flower.core.gossip import BlockError, MixingWeightsError, check_block, check_mixing_weights
from deca_flower.core.topology import build_graph
from deca_flower.flower import exchange, state
from deca_flower.flower.site_policy import SitePolicy, SitePolicyError
from deca_flower.protocol import messages as pm
from deca_flower.protocol.packing import RecordError
from deca_flower.protocol.tensors import block_to_record, record_to_block
from deca_flower.results import write_samples
from deca_flower.runtime import NodeRuntime
from deca_flower.secure import PairwiseChannel, SecurityError

log = logging.getLogger(__name__)

SECURE_STATE = "deca.secure"  # context.state: the node's per-run X25519 key and replay state (stays on the node)


class NodeSetupError(ValueError):
    """The SuperNode's node-config does not say which data partition it holds."""


def partition_id_of(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise NodeSetupError("node-config lacks 'partition-id' (set it with flower-supernode --node-config)")
    return int(context.node_config["partition-id"])


def runtime_of(msg: Message, context: Context) -> NodeRuntime:
    data_path = context.node_config.get("data-path")  # the site's own file, read by no one else
    return state.get_runtime(context, partition_id_of(context), str(data_path) if data_path else None,
                             msg.metadata.message_id)


def _refused(msg: Message, runtime: NodeRuntime, err: Exception, code: int = pm.BAD_NEIGHBOUR_BLOCK) -> Message:
    return Message(Error(code, f"node {runtime.partition_id}: {err}"), reply_to=msg)


def secure_channel(runtime: NodeRuntime, context: Context) -> PairwiseChannel:
    """The node's pairwise channel as this run left it in the node's own context.state (its per-run
    key and the last step accepted from each neighbour), so a restarted process keeps refusing
    replayed and rewound steps."""
    if runtime.channel is None:
        cfg, pid = runtime.cfg, runtime.partition_id
        identity = context.node_config.get("identity-key") or Path(cfg.identity_key_dir) / f"node_{pid}.pem"
        saved = context.state.get(SECURE_STATE)
        runtime.channel = PairwiseChannel.from_saved(context.run_id, pid, Path(str(identity)), Path(cfg.trusted_keys),
                                                     dict(saved) if saved else None)
        _keep_channel_state(runtime.channel, context)
    return runtime.channel


def _keep_channel_state(channel: PairwiseChannel, context: Context) -> None:
    context.state[SECURE_STATE] = ConfigRecord(channel.saved_state())


def _neighbour_keys(ask: pm.TrainStep, channel: PairwiseChannel) -> list[int]:
    for pid in sorted(ask.public_keys):
        channel.add_neighbour(pid, ask.public_keys[pid], ask.signatures[pid])
    return sorted(ask.public_keys)


@functools.cache
def _announced_graph(topology: str, num_nodes: int, seed: int, edge_prob: float) -> nx.Graph:
    return build_graph(topology, num_nodes, seed=seed, edge_prob=edge_prob)


def known_graph(cfg: DecaConfig, dropped: list[int]) -> nx.Graph:
    """The graph the node knows: the run config's (the same on every node, fixed for the run) less
    the partitions the coordinator says are out of the run."""
    graph = _announced_graph(cfg.topology, cfg.num_nodes, cfg.seed, cfg.edge_prob)
    return graph.subgraph(set(graph) - set(dropped))


def gossip_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Mix the neighbours' half-step blocks (or, compressed, their public copies) into the active
    block, fold BMA, then go on."""
    if msg.metadata.message_type != pm.TrainStep.MESSAGE_TYPE:
        return call_next(msg, context)
    ask = pm.TrainStep.from_content(msg.content)
    if ask.self_weight is None:
        return call_next(msg, context)
    runtime = runtime_of(msg, context)
    cfg, node = runtime.cfg, runtime.node
    self_weight, others, senders, excluded = ask.self_weight, [], [], []
    try:  # the relay's W: never trusted to be the graph's (an inflated weight amplifies any difference)
        check_mixing_weights(runtime.partition_id, self_weight, ask.weights, known_graph(cfg, ask.dropped))
    except MixingWeightsError as err:
        log.error("node %d refused the relay's mixing weights: %s", runtime.partition_id, err)
        return _refused(msg, runtime, f"refused the mixing weights the relay sent: {err}", pm.BAD_RELAY_DATA)
    own = node.block_values()
    if cfg.secure_gossip:
        try:
            _neighbour_keys(ask, secure_channel(runtime, context))
        except SecurityError as err:
            return _refused(msg, runtime, err)
    try:
        for pid, record in sorted(ask.halves.items()):
            sender = f"node {pid}"
            try:
                block = exchange.take(ask, runtime, pid, record, own)
            except (BlockError, RecordError, SecurityError) as err:
                log.error("node %d rejected a neighbour block: %s", runtime.partition_id, err)
                if cfg.on_bad_block == "stop":
                    return _refused(msg, runtime, err)
                self_weight += ask.weights[pid]  # re-normalise: the excluded share stays with the node
                excluded.append(f"{sender}: {err}")
                continue
            others.append((ask.weights[pid], block))
            senders.append(sender)
    finally:
        if cfg.secure_gossip:  # the steps accepted, kept even when the node refuses the message
            _keep_channel_state(runtime.channel, context)
    try:
        if node.public is not None:  # on the public copies of the neighbours whose payloads were taken
            node.apply_public_mix({sender: weight for (weight, _), sender in zip(others, senders)})
        else:
            node.apply_mix(self_weight, others, senders, validated=True)
    except (BlockError, ValueError) as err:
        return _refused(msg, runtime, err)
    runtime.excluded_last_step = excluded
    return call_next(msg, context)


def _node_info(runtime: NodeRuntime, context: Context, started: float) -> pm.NodeInfo:
    channel = secure_channel(runtime, context) if runtime.cfg.secure_gossip else None
    shares_counts = SitePolicy.from_node_config(context.node_config).share_label_counts
    return pm.NodeInfo(
        partition_id=runtime.partition_id, device=str(runtime.device), train_examples=len(runtime.train),
        label_counts=runtime.label_counts if shares_counts else [], label_names=runtime.label_names,
        own_data=bool(runtime.data_path),
        num_blocks=len(runtime.blocks), block_names=[b.name for b in runtime.blocks],
        steps_per_visit=runtime.steps_per_visit, setup_s=time.time() - started,
        public_key=channel.public.hex() if channel else None, signature=channel.signature.hex() if channel else None,
        half_bytes=exchange.half_bytes(runtime, first=False), first_half_bytes=exchange.half_bytes(runtime, first=True))


def _configure(context: Context, run_config: dict) -> Error | None:
    """Take part with this run config, or say why the site's own node-config refuses it."""
    try:
        site = SitePolicy.from_node_config(context.node_config)
        state.configure(context, site.run_config_for_site(run_config, partition_id_of(context)))
    except SitePolicyError as err:
        log.error("%s", err)
        return Error(pm.BAD_RELAY_DATA, str(err))
    return None


def handle_setup(msg: Message, context: Context) -> Message:
    """Check the run config against the site's policy and validate it, load model and data now (so the
    first step is not slowed), say who we are."""
    started = time.time()
    ask = pm.Setup.from_content(msg.content)
    refused = _configure(context, ask.config)
    if refused:
        return Message(refused, reply_to=msg)
    runtime = runtime_of(msg, context)
    if ask.fresh:
        state.forget_checkpoints(runtime)
    return pm.reply(msg, _node_info(runtime, context, started))


def handle_rejoin_probe(msg: Message, context: Context) -> Message:
    started = time.time()
    refused = _configure(context, pm.RejoinProbe.from_content(msg.content).config)
    if refused:
        return Message(refused, reply_to=msg)
    return pm.reply(msg, _node_info(runtime_of(msg, context), context, started))


def handle_resume(msg: Message, context: Context) -> Message:
    ask = pm.Resume.from_content(msg.content)
    runtime = runtime_of(msg, context)
    state.restore_checkpoint(runtime, ask.visit)
    state.commit(context, runtime, msg.metadata.message_id)
    return pm.reply(msg, pm.Done())


def handle_donate(msg: Message, context: Context) -> Message:
    ask = pm.Donate.from_content(msg.content)
    node = runtime_of(msg, context).node
    blocks = {name: t for b in ask.blocks for name, t in node.stored_block(b).items()}
    return pm.reply(msg, pm.Donation(block_to_record(blocks)))


def handle_handover(msg: Message, context: Context) -> Message:
    """Rejoin: drop the unfinished visit and adopt a neighbour's current blocks (checked first)."""
    ask = pm.Handover.from_content(msg.content)
    runtime = runtime_of(msg, context)
    node = runtime.node
    try:
        received = record_to_block(ask.blocks, "the neighbour of a rejoining node")
        adopted = {}
        for block in node.blocks:
            if any(name in received for name in block.param_names):
                values = {name: received[name] for name in block.param_names if name in received}
                check_block(values, node.stored_block(block.index), f"the neighbour's block {block.index}")
                adopted[block.index] = values
    except (BlockError, RecordError) as err:
        return _refused(msg, runtime, f"cannot rejoin: {err}")
    node.end_block()
    for index, values in adopted.items():
        node.overwrite_block(index, values)
    state.save_blocks(runtime, adopted, ask.visit)
    state.commit(context, runtime, msg.metadata.message_id)
    return pm.reply(msg, pm.Done())


def handle_step(msg: Message, context: Context) -> Message:
    """Finish the visit of the active block if asked (save it: a block-boundary checkpoint), then
    one local step on the block asked for, if any."""
    ask = pm.TrainStep.from_content(msg.content)
    runtime = runtime_of(msg, context)
    node = runtime.node
    if ask.finish is not None and node.active_index is not None:  # (a node that just rejoined has nothing to finish)
        finished = {node.active_index: node.block_values()}
        node.end_block()
        # saved while the reply travels, unless the step below changes those weights or another process
        # may restore this node from disk before its next message
        background = ask.block is not None and ask.block not in finished and not state.syncs_every_step(runtime.cfg)
        state.save_blocks(runtime, finished, ask.finish, background=background)  # the sampler of the boundary
    result = pm.StepResult()
    if ask.block is not None:
        if ask.start:
            if node.active_index is not None:
                return _refused(msg, runtime, f"block {node.active_index} was not finished before the next visit",
                                pm.UNFINISHED_BLOCK)
            node.start_block(ask.block)
        started = time.time()
        result.loss, half = node.local_step(copy=False)  # packed (or sealed) below: the record is the copy
        result.step_s, result.opt_bytes = time.time() - started, float(node.peak_optimizer_bytes)
        channel, receivers = None, []
        if runtime.cfg.secure_gossip:  # one sealed copy per neighbour: the relay cannot read any
            channel = secure_channel(runtime, context)
            try:
                receivers = _neighbour_keys(ask, channel)
            except SecurityError as err:
                return _refused(msg, runtime, err)
        result.half, result.sealed = exchange.outgoing(node, half, channel, receivers, ask.step)
        result.excluded, runtime.excluded_last_step = runtime.excluded_last_step, []
    state.commit(context, runtime, msg.metadata.message_id)
    return pm.reply(msg, result)


def handle_evaluate(msg: Message, context: Context) -> Message:
    ask = pm.Evaluate.from_content(msg.content)
    runtime = runtime_of(msg, context)
    started = time.time()
    metrics = runtime.evaluate()
    metrics["eval-s"] = time.time() - started
    samples = runtime.samples() if ask.samples else []
    if samples and not SitePolicy.from_node_config(context.node_config).share_samples:
        kept = write_samples(state.node_dir(runtime.cfg, runtime.partition_id) / "samples.md", {runtime.partition_id: samples})
        log.info("node %d kept its generated samples in %s (node-config share-samples)", runtime.partition_id, kept)
        samples = []
    return pm.reply(msg, pm.Evaluation(metrics, [p for p, _ in samples], [a for _, a in samples]))
