"""The messages between the coordinator (ServerApp) and the nodes: one Flower message type per
purpose, each a small dataclass that converts to and from Flower records here and nowhere else.

    coordinator -> node                       node -> coordinator
    query.setup          Setup                NodeInfo      load model and data, say who it is
    query.rejoin_probe   RejoinProbe          NodeInfo      is a dropped node back?
    query.resume         Resume               Done          back to its checkpoint of a visit
    query.donate         Donate               Donation      the current values of some blocks
    query.handover       Handover             Done          adopt a neighbour's blocks, take part again
    query.initial_model  InitialModel         ModelArrays   FedAvg: the model every node starts from
    train.step           TrainStep            StepResult    mix the neighbours' halves, one local step
    evaluate.held_out     Evaluate             Evaluation    held-out metrics (and generated answers)

Records, by the type of a dataclass field `name`:
    int | float | bool | str | list of them    one ConfigRecord "deca.fields" (hyphenated keys); None: left out
    ArrayRecord                                 "deca.<name>"
    dict[int, ArrayRecord]                      "deca.<name>.<partition id>" each
    dict[int, float | str]                      ConfigRecord "deca.<name>", keyed by partition id
    dict[str, float]                            MetricRecord "deca.<name>"
    dict[str, Any] (a run config)               ConfigRecord "deca.<name>"

Only Setup and RejoinProbe carry the run config: a node validates it once and keeps it in its
Flower context (under CONFIG). Absent values are None, never a sentinel number. A message that
lacks what its type needs raises ProtocolError, naming it.
"""

from __future__ import annotations

import functools
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

BAD_NEIGHBOUR_BLOCK = 4001  # Error code: a neighbour's block, key or signature failed validation
BAD_RELAY_DATA = 4002       # Error code: what the relay itself sent (mixing weights, run config) was refused
REFUSED = (BAD_NEIGHBOUR_BLOCK, BAD_RELAY_DATA)  # a node refused the data: the run stops, the node is not dropped
UNFINISHED_BLOCK = 4003     # Error code: a visit started while another block was still active

FIELDS = "deca.fields"
CONFIG = "deca.config"  # also where a node keeps the run config in its context.state
FEDAVG_ARRAYS = "arrays"  # method fedavg: the global model's ArrayRecord in Flower's FedAvg messages


class ProtocolError(ValueError):
    """A message lacks a record or a field its type needs, or holds one of the wrong type."""


def request(node_id: int, payload: Payload) -> Message:
    """The Flower message that asks node `node_id` to carry out `payload` (a request dataclass)."""
    return Message(payload.to_content(), dst_node_id=node_id, message_type=payload.MESSAGE_TYPE)


def reply(to: Message, payload: Payload) -> Message:
    return Message(payload.to_content(), reply_to=to)


@functools.cache
def _layout(cls: type) -> dict[str, tuple[str, type, bool]]:
    """Field name -> (how it is stored, its value type, whether it may be None)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in fields(cls):
        hint, optional = hints[f.name], False
        if isinstance(hint, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            hint, optional = args[0], len(args) < len(typing.get_args(hint))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
        if hint is ArrayRecord:
            out[f.name] = ("array", ArrayRecord, optional)
        elif origin is dict and args[0] is int:
            out[f.name] = ("arrays" if args[1] is ArrayRecord else "by-id", args[1], optional)
        elif origin is dict:
            out[f.name] = ("metrics" if args[1] is float else "config", args[1], optional)
        else:
            out[f.name] = ("scalar", hint, optional)
    return out


def _checked(value: Any, kind: Any, what: str) -> Any:
    if typing.get_origin(kind) is list:
        if not isinstance(value, list):
            raise ProtocolError(f"'{what}' must be a list, got {value!r}")
        return [_checked(v, typing.get_args(kind)[0], what) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"'{what}' must be {kind.__name__}, got {value!r}")
    return value


def _record(content: RecordDict, key: str, kind: type) -> Any:
    if key not in content or not isinstance(content[key], kind):
        raise ProtocolError(f"message lacks its {kind.__name__} '{key}' (it has {sorted(content)})")
    return content[key]


@dataclass
class Payload:
    """Base of every message dataclass: the conversion to and from Flower records."""

    MESSAGE_TYPE: ClassVar[str] = ""  # requests: Flower's "<category>.<action>"; replies answer with their request's

    def to_content(self) -> RecordDict:
        content, scalars = RecordDict(), {}
        for name, (stored, _, _) in _layout(type(self)).items():
            value, key = getattr(self, name), f"deca.{name}"
            if value is None:
                continue
            if stored == "scalar":
                scalars[name.replace("_", "-")] = value
            elif stored == "array":
                content[key] = value
            elif stored == "arrays":
                for j, record in value.items():
                    content[f"{key}.{j}"] = record
            elif stored == "by-id":
                content[key] = ConfigRecord({str(j): v for j, v in value.items()})
            else:
                content[key] = (MetricRecord if stored == "metrics" else ConfigRecord)(value)
        if scalars:
            content[FIELDS] = ConfigRecord(scalars)
        return content

    @classmethod
    def from_content(cls, content: RecordDict) -> Any:
        layout, values = _layout(cls), {}
        scalars = _record(content, FIELDS, ConfigRecord) if any(s == "scalar" for s, _, _ in layout.values()) else {}
        for name, (stored, kind, optional) in layout.items():
            key, scalar_key = f"deca.{name}", name.replace("_", "-")
            if stored == "scalar":
                if scalar_key not in scalars and not optional:
                    raise ProtocolError(f"'{FIELDS}' lacks '{scalar_key}' (it has {sorted(scalars)})")
                values[name] = _checked(scalars[scalar_key], kind, scalar_key) if scalar_key in scalars else None
            elif stored == "array":
                values[name] = _record(content, key, ArrayRecord) if key in content or not optional else None
            elif stored == "arrays":
                prefix = f"{key}."
                values[name] = {int(k[len(prefix):]): r for k, r in content.array_records.items()
                                if k.startswith(prefix) and k[len(prefix):].isdigit()}
            elif stored == "by-id":
                record = _record(content, key, ConfigRecord) if key in content else {}
                if not all(j.isdigit() for j in record):
                    raise ProtocolError(f"'{key}' must be keyed by partition ids, got {sorted(record)}")
                values[name] = {int(j): _checked(v, kind, f"{key}[{j}]") for j, v in record.items()}
            elif stored == "metrics":
                values[name] = {k: _checked(v, float, f"{key}[{k}]")
                                for k, v in _record(content, key, MetricRecord).items()}
            else:
                values[name] = dict(_record(content, key, ConfigRecord))
        return cls(**values)


# -- requests ------------------------------------------------------------------------------

@dataclass
class Setup(Payload):
    """Load model and data for this run; fresh: also delete checkpoints an earlier attempt of the run left."""

    MESSAGE_TYPE: ClassVar[str] = "query.setup"
    config: dict[str, Any]
    fresh: bool = True


@dataclass
class RejoinProbe(Payload):
    """Sent at a block boundary to every connected node not taking part; the config, should it have restarted."""

    MESSAGE_TYPE: ClassVar[str] = "query.rejoin_probe"
    config: dict[str, Any]


@dataclass
class Resume(Payload):
    """Go back to this node's own checkpoint at the end of block visit `visit`."""

    MESSAGE_TYPE: ClassVar[str] = "query.resume"
    visit: int


@dataclass
class Donate(Payload):
    """Send the current values of these blocks (for a neighbour that rejoins)."""

    MESSAGE_TYPE: ClassVar[str] = "query.donate"
    blocks: list[int]


@dataclass
class Handover(Payload):
    """Adopt these blocks (a neighbour's, packed) and take part again after visit `visit`."""

    MESSAGE_TYPE: ClassVar[str] = "query.handover"
    visit: int
    blocks: ArrayRecord


@dataclass
class InitialModel(Payload):
    """FedAvg: send the model as loaded (the same seeded initialisation on every node)."""

    MESSAGE_TYPE: ClassVar[str] = "query.initial_model"


@dataclass
class TrainStep(Payload):
    """One inner step: mix the neighbours' previous halves (when self_weight is set), finish the
    active block as visit `finish` (when set), then one local step on `block` (when set)."""

    MESSAGE_TYPE: ClassVar[str] = "train.step"
    step: int                           # the run's inner-step counter (secure gossip: halves were sealed at step - 1)
    block: int | None = None            # block to take a local step on; None: mix (and finish) only
    start: bool = False                 # first step of a visit: fresh Adam moments
    finish: int | None = None           # after mixing, finish the active block and save it as this visit
    self_weight: float | None = None    # W[i, i]; None: nothing to mix yet
    weights: dict[int, float] = field(default_factory=dict)        # neighbour partition id -> W[i, j]
    dropped: list[int] = field(default_factory=list)  # partition ids out of the run: W is over the graph without them
    halves: dict[int, ArrayRecord] = field(default_factory=dict)   # neighbour -> its half (packed, or sealed for i)
    public_keys: dict[int, str] = field(default_factory=dict)      # secure gossip: neighbour -> X25519 key (hex) ...
    signatures: dict[int, str] = field(default_factory=dict)       # ... signed by its identity key (hex)

    def __post_init__(self) -> None:
        if self.halves and self.halves.keys() != self.weights.keys():
            raise ProtocolError(f"halves from {sorted(self.halves)} but weights for {sorted(self.weights)}")
        if self.public_keys.keys() != self.signatures.keys():
            raise ProtocolError(f"keys of {sorted(self.public_keys)} but signatures of {sorted(self.signatures)}")


@dataclass
class Evaluate(Payload):
    """Held-out metrics of the node's current model; samples: also its answers to a few prompts (instruct)."""

    MESSAGE_TYPE: ClassVar[str] = "evaluate.held_out"
    samples: bool = False


# -- replies -------------------------------------------------------------------------------

@dataclass
class NodeInfo(Payload):
    """Who a node is and what it loaded (the reply to Setup and RejoinProbe)."""

    partition_id: int
    device: str
    train_examples: int
    label_counts: list[int]
    label_names: list[str]
    own_data: bool              # trains on its own file (node-config data-path), not a share of the demo split
    num_blocks: int
    block_names: list[str]
    steps_per_visit: int
    setup_s: float
    public_key: str | None = None  # secure gossip: the node's X25519 key for this run (hex) ...
    signature: str | None = None   # ... signed by its identity key (hex)
    half_bytes: list[int] = field(default_factory=list)  # per block: bytes of one half it sends (packed or sealed)
    first_half_bytes: list[int] = field(default_factory=list)  # ... at a visit's first step (compressed: int8)


@dataclass
class Done(Payload):
    """The request was carried out; nothing to report."""


@dataclass
class Donation(Payload):
    blocks: ArrayRecord  # packed: the tensors of every block asked for


@dataclass
class ModelArrays(Payload):
    arrays: ArrayRecord  # every parameter once, in float32 (the layout of Flower's FedAvg)


@dataclass
class StepResult(Payload):
    """A node's new half (plain, or sealed per neighbour) and its step metrics, all None when it only
    mixed; the neighbour blocks it excluded this step, and why."""

    half: ArrayRecord | None = None
    sealed: dict[int, ArrayRecord] = field(default_factory=dict)  # receiver partition id -> ciphertext
    loss: float | None = None
    step_s: float | None = None     # forward + backward + Adam
    opt_bytes: float | None = None  # peak optimizer + gradient bytes so far
    excluded: list[str] = field(default_factory=list)


@dataclass
class Evaluation(Payload):
    metrics: dict[str, float]
    prompts: list[str] = field(default_factory=list)  # held-out prompts it answered (Evaluate.samples) ...
    answers: list[str] = field(default_factory=list)  # ... and its greedy answers
