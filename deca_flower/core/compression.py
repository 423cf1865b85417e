"""Codecs for compressed gossip: the plain tensors a node sends each step instead of its block.

Per tensor of the block (x: the fp32 difference to send, flattened):

    int8, int4   scale  fp32  [ceil(numel / chunk)]   max |x| per chunk / L   (L = 127; int4: 7)
                 q      int8  [numel]                 round(x / scale), in [-L, L]
                        int4: uint8 [ceil(numel / 2)], q + 8 in each nibble (low nibble first)
                 a chunk is `chunk` consecutive elements, or (chunk = 0) one row: the last dimension
    topk         index  int32 [k]  strictly increasing   where |x| is largest, k = ceil(fraction * numel)
                 value  fp32  [k]

plus a header, int64 [codec id, numel, chunk or k, seq] (seq: the payload's number in the visit).
A payload is a flat dict "<tensor name>/<part>" -> tensor, parts in the order above after
"header", so the Flower side can pack it like any block. Every part is 1-D, and its dtype and size
follow from (codec, numel) alone: check_payload compares the header and each shape with what the
receiver's own block predicts before anything is decoded or allocated from the payload.

Decoding is deterministic on every device: q * scale is one rounded product per element, added
to the copy as a separate rounded sum (never a fused multiply-add), and top-k writes distinct
indices; every node that holds a copy of a neighbour's public block holds the same bits.

    exercised by: pytest tests/test_compression.py
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from deca_flower.core.conventions import COMPRESSIONS
from deca_flower.core.gossip import BlockError

# elements quantised or decoded at a time: bounds the per-chunk temporaries (a few MiB); int4's packing
# and unpacking still copy a whole tensor, as does the fp32 difference PublicCopies.publish encodes
SLICE = 1 << 20
LEVELS = {"int8": 127, "int4": 7}
CODEC_IDS = {name: i for i, name in enumerate(COMPRESSIONS)}  # header value; "none" (0) never travels
PARTS = {"int8": ("scale", "q"), "int4": ("scale", "q"), "topk": ("index", "value")}
HEADER = "header"
HEADER_FIELDS = ("codec", "numel", "chunk or k", "seq")
FLOAT32_MAX = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class Codec:
    """One compression operator C: `name` with its chunk (int8, int4) or fraction (topk)."""

    name: str
    chunk: int = 64
    fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in PARTS:
            raise ValueError(f"codec must be one of {sorted(PARTS)}, got '{self.name}'")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
            raise ValueError(f"compression chunk must be an integer >= 0 (0 = per row), got {self.chunk!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"top-k fraction must be in (0, 1], got {self.fraction!r}")

    def __str__(self) -> str:
        if self.name == "topk":
            return f"topk {self.fraction:g}"
        return f"{self.name} " + (f"chunk {self.chunk}" if self.chunk else "per row")

    def param(self, shape: Sequence[int]) -> int:
        """Elements per scale (int8, int4; at most numel) or k (topk) for a tensor of `shape`."""
        numel = math.prod(shape)
        if self.name == "topk":
            return min(numel, max(1, math.ceil(self.fraction * numel)))
        chunk = self.chunk or (shape[-1] if len(shape) else 1)
        return max(1, min(chunk, numel))

    def layout(self, shape: Sequence[int]) -> dict[str, tuple[torch.dtype, int]]:
        """Part name -> (dtype, number of elements) of the payload of one tensor, header first."""
        numel, param = math.prod(shape), self.param(shape)
        if self.name == "topk":
            parts = {"index": (torch.int32, param), "value": (torch.float32, param)}
        else:
            q = (torch.int8, numel) if self.name == "int8" else (torch.uint8, (numel + 1) // 2)
            parts = {"scale": (torch.float32, -(-numel // param)), "q": q}
        return {HEADER: (torch.int64, len(HEADER_FIELDS)), **parts}

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parts (no header) of C(x) for one fp32 tensor."""
        flat = x.reshape(-1)
        if self.name == "topk":
            if flat.numel() >= 2**31:
                raise ValueError(f"top-k indices are int32: a tensor of {flat.numel()} elements is too large")
            index = torch.topk(flat.abs(), self.param(x.shape), sorted=False).indices.sort().values
            return {"index": index.to(torch.int32), "value": flat[index]}
        levels, chunk = LEVELS[self.name], self.param(x.shape)
        scale = torch.empty(-(-flat.numel() // chunk), dtype=torch.float32, device=x.device)
        q = torch.empty(flat.numel(), dtype=torch.int8, device=x.device)
        for start, rows, length in _row_groups(flat.numel(), chunk):
            view = flat[start:start + rows * length].view(rows, length)
            row_scale = view.abs().amax(dim=1).div_(levels)
            scale[start // chunk:start // chunk + rows] = row_scale
            divisor = torch.where(row_scale > 0, row_scale, torch.ones_like(row_scale))  # an all-zero chunk sends 0
            q[start:start + rows * length] = torch.round(view / divisor[:, None]).clamp_(-levels, levels).view(-1)
        return {"scale": scale, "q": q if self.name == "int8" else _pack_nibbles(q)}

    @torch.no_grad()
    def add_decoded(self, copy: torch.Tensor, parts: Mapping[str, torch.Tensor]) -> None:
        """copy += decode(parts), in place (copy: a contiguous fp32 tensor of the right size)."""
        flat = copy.view(-1)
        if self.name == "topk":
            index = parts["index"].to(device=copy.device, dtype=torch.long)
            flat[index] = flat[index] + parts["value"].to(copy.device)  # distinct indices: no accumulation order
            return
        chunk, scale = self.param(copy.shape), parts["scale"].to(copy.device)
        q = parts["q"].to(copy.device)
        q = q if self.name == "int8" else _unpack_nibbles(q, flat.numel())
        for start, rows, length in _row_groups(flat.numel(), chunk):
            end, first = start + rows * length, start // chunk
            delta = q[start:end].reshape(rows, length).float() * scale[first:first + rows, None]
            flat[start:end].view(rows, length).add_(delta)


def _row_groups(numel: int, chunk: int) -> Iterator[tuple[int, int, int]]:
    """(first element, rows, row length) covering a flat tensor of `numel` elements: whole chunks,
    about SLICE elements at a time, then the shorter last chunk if numel is not a multiple."""
    full = numel // chunk
    per_group = max(1, SLICE // chunk)
    for row in range(0, full, per_group):
        yield row * chunk, min(per_group, full - row), chunk
    if numel % chunk:
        yield full * chunk, 1, numel % chunk


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-7, 7] -> uint8, two per byte (low nibble first); an odd tail pads with 0."""
    shifted = (q + 8).to(torch.uint8)
    if shifted.numel() % 2:
        shifted = torch.cat([shifted, shifted.new_full((1,), 8)])
    return shifted[0::2] | (shifted[1::2] << 4)


def _unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    pairs = torch.stack([packed & 15, packed >> 4], dim=1).view(-1)[:numel]
    return pairs.to(torch.int8) - 8


# -- block payloads -------------------------------------------------------------------------------

def encode_block(codec: Codec, differences: Iterable[tuple[str, torch.Tensor]], seq: int) -> dict[str, torch.Tensor]:
    """The payload of a block: per (tensor name, fp32 difference), the header and the parts of
    C(difference). A generator of differences keeps one tensor's difference alive at a time."""
    payload = {}
    for name, x in differences:
        payload[f"{name}/{HEADER}"] = torch.tensor([CODEC_IDS[codec.name], x.numel(), codec.param(x.shape), seq],
                                                   dtype=torch.int64)
        payload.update({f"{name}/{part}": t for part, t in codec.encode(x).items()})
    return payload


def add_block(codec: Codec, copies: Mapping[str, torch.Tensor], payload: Mapping[str, torch.Tensor]) -> None:
    """copies[name] += decoded payload of that tensor, for every tensor (after check_payload)."""
    for name, copy in copies.items():
        codec.add_decoded(copy, {part: payload[f"{name}/{part}"] for part in PARTS[codec.name]})


def payload_layout(codec: Codec, shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[torch.dtype, int]]:
    """Key -> (dtype, elements) of every tensor a payload of this block must have, in packing order."""
    return {f"{name}/{part}": spec for name, shape in shapes.items() for part, spec in codec.layout(shape).items()}


def payload_bytes(payload: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in payload.values())


def layout_bytes(codec: Codec, shapes: Mapping[str, Sequence[int]]) -> int:
    """payload_bytes of a payload of a block of `shapes`, without encoding it."""
    return sum(count * dtype.itemsize for dtype, count in payload_layout(codec, shapes).values())


def check_payload(payload: Mapping[str, torch.Tensor], codec: Codec, shapes: Mapping[str, Sequence[int]], seq: int,
                  sender: str) -> None:
    """Raise BlockError, naming `sender`, unless the payload is exactly what a block of `shapes`
    compressed by `codec` as payload number `seq` gives: the keys, each header, the dtype and 1-D
    shape of each part (all known before decoding), finite scales and values, quantised values in [-L, L]
    (int4: padding nibble 8), top-k indices in range.
    Shapes come from the sender's manifest, so every part's is checked, not only its size: a scale
    of shape [n, 1] would broadcast against the quantised rows into an n x n temporary."""
    layout = payload_layout(codec, shapes)
    missing, extra = sorted(set(layout) - set(payload)), sorted(set(payload) - set(layout))
    if missing or extra:
        raise BlockError(f"compressed block from {sender}: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, shape in shapes.items():
        numel, param = math.prod(shape), codec.param(shape)
        header = payload[f"{name}/{HEADER}"]
        if header.dtype != torch.int64 or tuple(header.shape) != (len(HEADER_FIELDS),):
            raise BlockError(f"compressed block from {sender}: '{name}' has a header of shape {tuple(header.shape)} "
                             f"{header.dtype}, expected ({len(HEADER_FIELDS)},) int64 ({', '.join(HEADER_FIELDS)})")
        expected = (CODEC_IDS[codec.name], numel, param, seq)
        got = tuple(int(v) for v in header)
        if got != expected:
            raise BlockError(f"compressed block from {sender}: '{name}' header says "
                             f"{dict(zip(HEADER_FIELDS, got))}, expected {dict(zip(HEADER_FIELDS, expected))}")
        for part, (dtype, count) in codec.layout(shape).items():
            tensor = payload[f"{name}/{part}"]
            if tensor.dtype != dtype or tuple(tensor.shape) != (count,):  # 1-D: decoding indexes it as flat
                raise BlockError(f"compressed block from {sender}: '{name}/{part}' is {tensor.dtype} of shape "
                                 f"{tuple(tensor.shape)}; its header (numel {numel}, {codec.name}) means {dtype} of "
                                 f"shape ({count},)")
        _check_values(codec, {part: payload[f"{name}/{part}"] for part in PARTS[codec.name]}, numel, f"'{name}'", sender)


def _check_values(codec: Codec, parts: Mapping[str, torch.Tensor], numel: int, what: str, sender: str) -> None:
    if codec.name == "topk":
        index = parts["index"]
        if int(index.min()) < 0 or int(index.max()) >= numel or bool((index[1:] <= index[:-1]).any()):
            raise BlockError(f"compressed block from {sender}: {what} has top-k indices out of range "
                             f"[0, {numel}) or not strictly increasing")
        if not bool(torch.isfinite(parts["value"]).all()):
            raise BlockError(f"compressed block from {sender}: {what} has NaN or Inf values")
        return
    scale, q, levels = parts["scale"], parts["q"], LEVELS[codec.name]
    # finite, >= 0, and small enough that L * scale stays finite (NaN fails every comparison)
    if not bool(((scale >= 0) & (scale <= FLOAT32_MAX / levels)).all()):
        raise BlockError(f"compressed block from {sender}: {what} has a NaN, Inf, negative or overflowing scale")
    # q in [-L, L], so q * scale stays finite too: int8 -128, and int4's nibble 0 (-8), are never sent
    if codec.name == "int8" and bool((q == -levels - 1).any()):
        raise BlockError(f"compressed block from {sender}: {what} has quantised values outside [-{levels}, {levels}]")
    if codec.name == "int4":
        if numel % 2 and int(q[-1]) >> 4 != 8:
            raise BlockError(f"compressed block from {sender}: {what} has a padding nibble of {int(q[-1]) >> 4}, not 8")
        if bool(((q & 15) == 0).any()) or bool(((q >> 4) == 0).any()):
            raise BlockError(f"compressed block from {sender}: {what} has a nibble 0 (q = -8, outside [-{levels}, {levels}])")
