"""secure-gossip: same numbers, the relay holds only ciphertext, tampering and key swaps are caught."""

import pytest
import torch

from deca_flower.flower.transport import CoordinationError
from deca_flower.secure import PairwiseChannel, write_demo_identities
from tests.test_bad_input import started_coordinator, warm_runtime
from tests.test_flower_matches_reference import flower_run


@pytest.fixture
def secure_cfg(tiny_cfg, tmp_path):  # the irregular 4-node graph: 0-3, 1-2, 1-3, 2-3
    keys = write_demo_identities(tiny_cfg.num_nodes, tmp_path / "keys")
    return tiny_cfg.replace(secure_gossip=True, trusted_keys=str(keys / "trusted.json"), identity_key_dir=str(keys))


def test_secure_run_gives_the_same_models(secure_cfg):
    _, _, sealed = flower_run(secure_cfg)
    _, _, plain = flower_run(secure_cfg.replace(secure_gossip=False))
    for a, b in zip(sealed, plain):
        for (name, pa), pb in zip(a.node.model.named_parameters(), b.node.model.parameters()):
            assert torch.equal(pa, pb), name


def test_relay_sees_only_ciphertext_and_tampering_is_detected(secure_cfg, tmp_path):
    coordinator, grid = started_coordinator(secure_cfg, tmp_path)
    coordinator.exchange(block=1, start=True)
    assert sorted(coordinator.progress.halves[3].sealed) == [0, 1, 2]  # one copy per neighbour of node 3
    relayed = coordinator.progress.halves[3].sealed[0]["ct"].data
    plain = b"".join(v.contiguous().view(torch.uint8).numpy().tobytes()
                     for v in warm_runtime(coordinator, grid, 3).node.block_values().values())
    assert len(relayed) == len(plain) + 16 and plain[:64] not in relayed  # AES-GCM: same size + tag, no plaintext
    # the relay holds both public keys but no private one: a key of its own does not open the block
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    guess = X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(
        bytes.fromhex(coordinator.membership.public_keys[3][0])))
    key = HKDF(hashes.SHA256(), 32, salt=None, info=f"deca-flower pair 0-3 run {grid.run_id}".encode()).derive(guess)
    with pytest.raises(InvalidTag):
        AESGCM(key).decrypt((0).to_bytes(8, "big") + (3).to_bytes(4, "big"), relayed, f"{grid.run_id}|0|3->0|1".encode())
    # flip one byte in transit: the receiving node refuses it
    record = coordinator.progress.halves[3].sealed[0]
    tampered = bytearray(record["ct"].data)
    tampered[100] ^= 1
    record["ct"].data = bytes(tampered)
    with pytest.raises(CoordinationError, match="node 0: .*failed authentication"):
        coordinator.exchange(block=1, start=False)


def test_swapped_public_key_is_refused(secure_cfg, tmp_path):
    coordinator, _ = started_coordinator(secure_cfg, tmp_path)
    keys = coordinator.membership.public_keys
    mallory = PairwiseChannel(0, 2, (tmp_path / "keys" / "node_0.pem").read_bytes(), {})
    keys[2] = (mallory.public.hex(), keys[2][1])  # relay in the middle
    with pytest.raises(CoordinationError, match="not signed by its identity key"):
        coordinator.exchange(block=1, start=True)



@pytest.mark.parametrize(("relayed", "message"), [
    (("zz", None), "malformed public key or signature for node 2"),  # a ValueError crashed the node before
    ((None, "ab"), "not signed by its identity key"),
], ids=["key not hex", "short signature"])
def test_malformed_relayed_key_is_refused_as_a_bad_neighbour(secure_cfg, tmp_path, relayed, message):
    coordinator, _ = started_coordinator(secure_cfg, tmp_path)
    keys = coordinator.membership.public_keys
    public, signature = keys[2]
    keys[2] = (relayed[0] or public, relayed[1] or signature)
    with pytest.raises(CoordinationError, match=message):
        coordinator.exchange(block=1, start=True)
