"""Pairwise-encrypted gossip: the relay (ServerApp, SuperLink) sees only ciphertext.

Each node makes an X25519 key pair per run and signs its public key with its site's Ed25519
identity key (configured out of band); the coordinator relays the signed public keys, and every
node verifies its neighbours' signatures against the trusted public keys before deriving a pair
key (HKDF-SHA256). A relay that swaps a public key fails the signature check; a relay that
alters a ciphertext fails the AES-GCM tag. Blocks are sealed per neighbour with
AAD = run | step | sender -> receiver | block, so a ciphertext cannot be replayed at another
step or delivered to another node.

    deca-flower keys --nodes 4 --out keys/      # demo identities: node_<i>.pem + trusted.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


class SecurityError(ValueError):
    """A neighbour's key or ciphertext failed verification."""


def write_demo_identities(num_nodes: int, folder: Path) -> Path:
    """Ed25519 identity per node (PEM) and trusted.json {partition id: public key hex}."""
    folder.mkdir(parents=True, exist_ok=True)
    trusted = {}
    for pid in range(num_nodes):
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        (folder / f"node_{pid}.pem").write_bytes(pem)
        trusted[str(pid)] = key.public_key().public_bytes(*RAW).hex()
    (folder / "trusted.json").write_text(json.dumps(trusted, indent=1))
    return folder


def _signed_message(run_id: int, pid: int, public: bytes) -> bytes:
    return f"deca-flower x25519 run={run_id} node={pid} ".encode() + public


class PairwiseChannel:
    """One node's view: its ephemeral key, and the verified pair keys of its neighbours."""

    def __init__(self, run_id: int, partition_id: int, identity_pem: bytes, trusted: dict[str, str],
                 ephemeral: bytes | None = None) -> None:
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

    @classmethod
    def from_files(cls, run_id: int, partition_id: int, identity_key: Path, trusted_keys: Path,
                   ephemeral: bytes | None = None) -> PairwiseChannel:
        for path in (identity_key, trusted_keys):
            if not path.is_file():
                raise SecurityError(f"secure-gossip needs {path}, which does not exist")
        return cls(run_id, partition_id, identity_key.read_bytes(), json.loads(trusted_keys.read_text()), ephemeral)

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

    def _aad_nonce(self, sender: int, receiver: int, step: int, block: int) -> tuple[bytes, bytes]:
        aad = f"{self.run_id}|{step}|{sender}->{receiver}|{block}".encode()
        nonce = step.to_bytes(8, "big") + sender.to_bytes(4, "big")  # unique per (pair key, direction, step)
        return aad, nonce

    def seal(self, receiver: int, step: int, block: int, tensors: list[torch.Tensor]) -> bytes:
        payload = b"".join(_raw(t) for t in tensors)
        aad, nonce = self._aad_nonce(self.pid, receiver, step, block)
        return self.pair_keys[receiver].encrypt(nonce, payload, aad)

    def open(self, sender: int, step: int, block: int, ciphertext: bytes, like: list[torch.Tensor]) -> list[torch.Tensor]:
        if sender not in self.pair_keys:
            raise SecurityError(f"no verified key for node {sender}")
        aad, nonce = self._aad_nonce(sender, self.pid, step, block)
        try:
            payload = self.pair_keys[sender].decrypt(nonce, ciphertext, aad)
        except InvalidTag as err:
            raise SecurityError(f"block from node {sender} failed authentication (tampered or replayed)") from err
        out, offset = [], 0
        for ref in like:
            size = ref.numel() * ref.element_size()
            if offset + size > len(payload):
                raise SecurityError(f"block from node {sender} is too short")
            raw = np.frombuffer(payload[offset:offset + size], dtype=np.uint8).copy()
            out.append(torch.from_numpy(raw).view(ref.dtype).reshape(ref.shape))
            offset += size
        if offset != len(payload):
            raise SecurityError(f"block from node {sender} has {len(payload) - offset} extra bytes")
        return out


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
