"""Pairwise-encrypted gossip: the relay (ServerApp, SuperLink) sees only ciphertext.

Each node makes an X25519 key pair per run and signs its public key with its site's Ed25519
identity key (configured out of band); the coordinator relays the signed public keys, and every
node verifies its neighbours' signatures against the trusted public keys before deriving a pair
key (HKDF-SHA256). A relay that swaps a public key fails the signature check; a relay that
alters a ciphertext fails the AES-GCM tag.

Nonces and replay (the relay chooses the step numbers, so neither side may trust them):
- sealing: a fresh random 96-bit nonce per block, sent in front of the ciphertext. The sealing
  side keeps no counter that a crash, a restore from an older state, or a relay repeating a
  step could roll back, so no (pair key, nonce) pair repeats whatever the relay asks. Random
  nonces are safe up to 2^32 seals per key (NIST SP 800-38D); a pair key seals two blocks per
  step (one each way), so that is 2^31 steps of one run.
- AAD = run | step | sender -> receiver | block, so a ciphertext opens only at the step, in the
  direction and for the block it was sealed for.
- opening: per sender, the last step accepted; a step at or below it (a replay, or a rewind)
  is refused before decryption. The step is recorded only once the tag verified, so forged
  ciphertexts cannot push it forward.

What a node keeps between messages (`saved_state()`, a flat dict a ConfigRecord holds; never
sent anywhere): its per-run X25519 private key and the last step accepted per sender. Restore
it with `PairwiseChannel.from_saved`. A resume that re-runs steps after a checkpoint is a new
run (new run id, new context): it starts from no saved state, so new keys, no replay history,
and ciphertexts of the killed run open under neither.

    deca-flower keys --nodes 4 --out keys/      # demo identities: node_<i>.pem (0600) + trusted.json
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce
TAG_BYTES = 16
SEAL_OVERHEAD = NONCE_BYTES + TAG_BYTES  # bytes a sealed block adds to its plaintext
MAX_STEP = 2**63 - 1
_OPENED = "opened."  # saved_state() key prefix: the last step accepted from a sender


class SecurityError(ValueError):
    """A neighbour's key or ciphertext failed verification, or was replayed."""


def write_demo_identities(num_nodes: int, folder: Path) -> Path:
    """Ed25519 identity per node (PEM, owner-only 0600) and trusted.json {partition id: public key hex}.

    A new folder is made owner-only (0700). Existing identities are never overwritten: a site's
    identity key replaced by mistake would lock it out of every run."""
    if num_nodes < 1:
        raise SecurityError(f"--nodes must be >= 1, got {num_nodes}")
    names = [f"node_{pid}.pem" for pid in range(num_nodes)] + ["trusted.json"]
    existing = [name for name in names if (folder / name).exists()]
    if existing:
        raise SecurityError(f"{folder} already holds {existing[:3]}: choose another folder or remove them first")
    if not folder.exists():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)  # mkdir's mode is masked by the umask
    trusted = {}
    for pid in range(num_nodes):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        _write_private(folder / f"node_{pid}.pem", pem)
        trusted[str(pid)] = key.public_key().public_bytes(*RAW).hex()
    (folder / "trusted.json").write_text(json.dumps(trusted, indent=1))
    return folder


def _write_private(path: Path, data: bytes) -> None:
    """Created 0600 (never readable by others, not even for a moment), refusing an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)


def _signed_message(run_id: int, pid: int, public: bytes) -> bytes:
    return f"deca-flower x25519 run={run_id} node={pid} ".encode() + public


class PairwiseChannel:
    """One node's view: its ephemeral key, the verified pair keys of its neighbours, and the last
    step it accepted from each (replay state).

    Part of a node's state between messages: `saved_state()` -> the node's own store ->
    `from_saved(...)`. `ephemeral` / `last_opened` restore the same two things directly."""

    def __init__(self, run_id: int, partition_id: int, identity_pem: bytes, trusted: dict[str, str],
                 ephemeral: bytes | None = None, last_opened: Mapping[int, int] | None = None) -> None:
        self.run_id, self.pid = run_id, partition_id
        self.identity = serialization.load_pem_private_key(identity_pem, password=None)
        self.trusted = trusted
        # the per-run key survives process restarts through the node's own state (never leaves the node)
        self.ephemeral = X25519PrivateKey.from_private_bytes(ephemeral) if ephemeral else X25519PrivateKey.generate()
        self.ephemeral_bytes = self.ephemeral.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                            serialization.NoEncryption())
        self.public = self.ephemeral.public_key().public_bytes(*RAW)
        self.signature = self.identity.sign(_signed_message(run_id, partition_id, self.public))
        self.pair_keys: dict[int, AESGCM] = {}
        self.last_opened: dict[int, int] = dict(last_opened or {})

    @classmethod
    def from_files(cls, run_id: int, partition_id: int, identity_key: Path, trusted_keys: Path,
                   ephemeral: bytes | None = None, last_opened: Mapping[int, int] | None = None) -> PairwiseChannel:
        for path in (identity_key, trusted_keys):
            if not path.is_file():
                raise SecurityError(f"secure-gossip needs {path}, which does not exist")
        return cls(run_id, partition_id, identity_key.read_bytes(), json.loads(trusted_keys.read_text()),
                   ephemeral, last_opened)

    @classmethod
    def from_saved(cls, run_id: int, partition_id: int, identity_key: Path, trusted_keys: Path,
                   saved: Mapping[str, Any] | None) -> PairwiseChannel:
        """The channel as `saved_state()` left it in this run (None: a fresh key, no replay history)."""
        if not saved:
            return cls.from_files(run_id, partition_id, identity_key, trusted_keys)
        try:
            ephemeral = bytes.fromhex(str(saved["x25519"]))
            last_opened = {int(k[len(_OPENED):]): int(v) for k, v in saved.items() if k.startswith(_OPENED)}
        except (KeyError, ValueError) as err:
            raise SecurityError(f"node {partition_id}'s saved secure-gossip state is malformed: {err}") from None
        return cls.from_files(run_id, partition_id, identity_key, trusted_keys, ephemeral, last_opened)

    def saved_state(self) -> dict[str, str | int]:
        """What the node must keep (privately) to continue this run: its key and replay state, as a
        flat {str: str | int} dict a ConfigRecord holds (context.state)."""
        return {"x25519": self.ephemeral_bytes.hex(), **{f"{_OPENED}{pid}": step for pid, step in self.last_opened.items()}}

    def add_neighbour(self, pid: int, public_hex: str, signature_hex: str) -> None:
        if pid in self.pair_keys:
            return
        if str(pid) not in self.trusted:
            raise SecurityError(f"node {pid} has no trusted identity key")
        try:
            public = bytes.fromhex(public_hex)
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.trusted[str(pid)])).verify(
                bytes.fromhex(signature_hex), _signed_message(self.run_id, pid, public))
            peer = X25519PublicKey.from_public_bytes(public)
        except InvalidSignature as err:
            raise SecurityError(f"public key of node {pid} is not signed by its identity key "
                                "(a relay in the middle?)") from err
        except ValueError as err:  # not hex, or not a key's length
            raise SecurityError(f"malformed public key or signature for node {pid}: {err}") from None
        shared = self.ephemeral.exchange(peer)
        lo, hi = sorted((self.pid, pid))
        key = HKDF(hashes.SHA256(), 32, salt=None, info=f"deca-flower pair {lo}-{hi} run {self.run_id}".encode()).derive(shared)
        self.pair_keys[pid] = AESGCM(key)

    def _aad(self, sender: int, receiver: int, step: int, block: int) -> bytes:
        if not 0 <= step <= MAX_STEP:
            raise SecurityError(f"step {step} is outside 0..2^63-1")
        return f"{self.run_id}|{step}|{sender}->{receiver}|{block}".encode()

    def seal(self, receiver: int, step: int, block: int, tensors: list[torch.Tensor]) -> bytes:
        """nonce || AES-GCM(payload) || tag, the nonce fresh from the OS for every call."""
        payload = _packed(tensors)
        nonce = os.urandom(NONCE_BYTES)
        sealed = np.empty(NONCE_BYTES + payload.size + TAG_BYTES, dtype=np.uint8)  # `nonce + ciphertext` would copy it all
        sealed[:NONCE_BYTES] = np.frombuffer(nonce, dtype=np.uint8)
        self.pair_keys[receiver].encrypt_into(nonce, payload, self._aad(self.pid, receiver, step, block),
                                              memoryview(sealed)[NONCE_BYTES:])
        return sealed.tobytes()

    def open(self, sender: int, step: int, block: int, ciphertext: bytes, like: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors `sender` sealed for this node at `step` (shaped as `like`), checked in this order:
        a verified key, the size, a step after the last accepted from `sender`, then the tag."""
        if sender not in self.pair_keys:
            raise SecurityError(f"no verified key for node {sender}")
        sizes = [ref.numel() * ref.element_size() for ref in like]
        expected = sum(sizes) + SEAL_OVERHEAD
        if len(ciphertext) != expected:  # before decrypting: no work for a block of the wrong size
            raise SecurityError(f"block from node {sender} is {len(ciphertext)} bytes sealed, expected {expected}")
        last = self.last_opened.get(sender)
        if last is not None and step <= last:
            raise SecurityError(f"block from node {sender} is for step {step}, but step {last} was already accepted "
                                "from it (a replayed or rewound step)")
        aad = self._aad(sender, self.pid, step, block)
        try:
            payload = self.pair_keys[sender].decrypt(ciphertext[:NONCE_BYTES], memoryview(ciphertext)[NONCE_BYTES:], aad)
        except InvalidTag as err:
            raise SecurityError(f"block from node {sender} failed authentication (tampered, or sealed for "
                                "another step, block or receiver)") from err
        self.last_opened[sender] = step
        out, offset = [], 0
        for ref, size in zip(like, sizes):
            raw = np.frombuffer(payload, dtype=np.uint8, count=size, offset=offset).copy()  # writable, one copy
            out.append(torch.from_numpy(raw).view(ref.dtype).reshape(ref.shape))
            offset += size
        return out


def _packed(tensors: list[torch.Tensor]) -> np.ndarray:
    """The tensors' bytes, one after another, copied once into one buffer."""
    flat = [t.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1) for t in tensors]
    return np.concatenate(flat) if flat else np.empty(0, dtype=np.uint8)
