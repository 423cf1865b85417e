"""secure-gossip: same numbers, the relay holds only ciphertext; tampering, key swaps, nonce reuse,
replayed and rewound steps are caught (the relay plays the attacker)."""

import json
import stat

import pytest
import torch

from deca_flower.flower.transport import CoordinationError
from deca_flower.secure import NONCE_BYTES, SEAL_OVERHEAD, PairwiseChannel, SecurityError, write_demo_identities
from tests.test_bad_input import started_coordinator, warm_runtime
from tests.test_flower_matches_reference import flower_run


@pytest.fixture
def secure_cfg(tiny_cfg, tmp_path):  # the irregular 4-node graph: 0-3, 1-2, 1-3, 2-3
    keys = write_demo_identities(tiny_cfg.num_nodes, tmp_path / "keys")
    return tiny_cfg.replace(secure_gossip=True, trusted_keys=str(keys / "trusted.json"), identity_key_dir=str(keys))


@pytest.mark.parametrize("compression", ["none", "int4"])
def test_secure_run_gives_the_same_models(secure_cfg, compression):
    # compressed: each payload is compressed, then sealed per neighbour
    _, _, sealed = flower_run(secure_cfg.replace(compression=compression))
    _, _, plain = flower_run(secure_cfg.replace(secure_gossip=False, compression=compression, run_name="plain"))
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
    assert len(relayed) == len(plain) + SEAL_OVERHEAD and plain[:64] not in relayed  # nonce + AES-GCM + tag
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
        AESGCM(key).decrypt(relayed[:NONCE_BYTES], relayed[NONCE_BYTES:], f"{grid.run_id}|0|3->0|1".encode())
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


def test_a_relay_that_replays_or_rewinds_a_step_is_refused(secure_cfg, tmp_path):
    coordinator, _ = started_coordinator(secure_cfg, tmp_path)
    coordinator.exchange(block=1, start=True)  # step 0: sealed, not mixed yet
    sealed_at_0 = dict(coordinator.progress.halves)
    coordinator.exchange(block=1, start=False)  # step 1: the nodes open and mix step 0's blocks
    progress = coordinator.progress
    progress.halves, progress.step = sealed_at_0, 1  # the relay delivers step 0 again, as if it were new
    with pytest.raises(CoordinationError, match=r"is for step 0, but step 0 was already accepted"):
        coordinator.exchange(block=1, start=False)


def test_a_restarted_node_still_refuses_a_replayed_step(secure_cfg, tmp_path):
    """The replay state lives in the node's context.state, not only in its process: a node whose
    process restarted (no warm copy) refuses the step it accepted before the restart."""
    from deca_flower.flower import state

    coordinator, _ = started_coordinator(secure_cfg.replace(state_sync="step"), tmp_path)
    coordinator.exchange(block=1, start=True)
    sealed_at_0 = dict(coordinator.progress.halves)
    coordinator.exchange(block=1, start=False)
    state._WARM.clear()  # every node process restarts: rebuilt from disk and its context
    progress = coordinator.progress
    progress.halves, progress.step = sealed_at_0, 1
    with pytest.raises(CoordinationError, match=r"is for step 0, but step 0 was already accepted"):
        coordinator.exchange(block=1, start=False)


@pytest.fixture
def keys(tmp_path):
    return write_demo_identities(2, tmp_path / "pair-keys")


def channel_pair(keys, run_id=7):
    """Nodes 0 and 1 of run `run_id`, each with the other's verified key."""
    trusted = json.loads((keys / "trusted.json").read_text())
    a, b = (PairwiseChannel(run_id, pid, (keys / f"node_{pid}.pem").read_bytes(), trusted) for pid in (0, 1))
    a.add_neighbour(1, b.public.hex(), b.signature.hex())
    b.add_neighbour(0, a.public.hex(), a.signature.hex())
    return a, b


def block(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 8, generator=generator), torch.randn(5, generator=generator)]


def test_sealing_twice_at_the_same_step_never_reuses_a_nonce(keys):
    # a relay that asks a node to seal step 5 twice (or a node re-running step 5 after a restore)
    a, b = channel_pair(keys)
    first, second = block(0), block(1)
    c1, c2 = a.seal(1, 5, 3, first), a.seal(1, 5, 3, second)
    assert c1[:NONCE_BYTES] != c2[:NONCE_BYTES]
    p1, p2 = (b"".join(t.numpy().tobytes() for t in x) for x in (first, second))
    body1, body2 = c1[NONCE_BYTES:-16], c2[NONCE_BYTES:-16]
    xor = bytes(x ^ y for x, y in zip(body1, body2))
    assert xor != bytes(x ^ y for x, y in zip(p1, p2))  # with a repeated nonce these are equal: the keystream cancels
    assert a.seal(1, 5, 3, first) != c1  # the same block sealed again is another ciphertext
    assert all(torch.equal(x, y) for x, y in zip(b.open(0, 5, 3, c1, first), first))
    with pytest.raises(SecurityError, match="already accepted"):  # the second one at the same step: refused
        b.open(0, 5, 3, c2, second)


def test_replayed_rewound_or_relabelled_steps_are_refused(keys):
    a, b = channel_pair(keys)
    sealed = {step: a.seal(1, step, 3, block(step)) for step in range(4)}
    b.open(0, 1, 3, sealed[1], block(1))
    b.open(0, 2, 3, sealed[2], block(2))
    with pytest.raises(SecurityError, match="is for step 2, but step 2 was already accepted"):  # replayed
        b.open(0, 2, 3, sealed[2], block(2))
    with pytest.raises(SecurityError, match="is for step 1, but step 2 was already accepted"):  # rewound
        b.open(0, 1, 3, sealed[1], block(1))
    with pytest.raises(SecurityError, match="failed authentication"):  # step 2's block sold as step 9 (AAD)
        b.open(0, 9, 3, sealed[2], block(2))
    with pytest.raises(SecurityError, match="failed authentication"):  # or as another block
        b.open(0, 3, 4, sealed[3], block(3))
    opened = b.open(0, 3, 3, sealed[3], block(3))  # the forgeries did not move the replay state
    assert all(torch.equal(x, y) for x, y in zip(opened, block(3)))
    assert b.last_opened == {0: 3}


def test_a_block_of_the_wrong_size_is_refused_before_decryption(keys):
    a, b = channel_pair(keys)
    sealed = a.seal(1, 0, 3, block(0))

    class NoDecrypt:
        def decrypt(self, *args):
            raise AssertionError("decrypted a block of the wrong size")

    b.pair_keys[0] = NoDecrypt()
    for wrong in (sealed[:-1], sealed + b"x", b"", sealed * 1000):
        with pytest.raises(SecurityError, match=f"is {len(wrong)} bytes sealed, expected {len(sealed)}"):
            b.open(0, 0, 3, wrong, block(0))


def test_replay_state_is_kept_with_the_node_state_and_restored(keys):
    from flwr.app import ConfigRecord

    a, b = channel_pair(keys)
    old, new = a.seal(1, 4, 3, block(4)), a.seal(1, 5, 3, block(5))
    b.open(0, 4, 3, old, block(4))
    saved = ConfigRecord(b.saved_state())  # what the node keeps in its own context.state
    assert set(saved) == {"x25519", "opened.0"} and saved["opened.0"] == 4
    restarted = PairwiseChannel.from_saved(7, 1, keys / "node_1.pem", keys / "trusted.json", dict(saved))
    restarted.add_neighbour(0, a.public.hex(), a.signature.hex())
    assert restarted.public == b.public  # the same per-run key: neighbours need not be told anything
    with pytest.raises(SecurityError, match="already accepted"):
        restarted.open(0, 4, 3, old, block(4))
    assert all(torch.equal(x, y) for x, y in zip(restarted.open(0, 5, 3, new, block(5)), block(5)))
    with pytest.raises(SecurityError, match="saved secure-gossip state is malformed"):
        PairwiseChannel.from_saved(7, 1, keys / "node_1.pem", keys / "trusted.json", {"x25519": "zz"})


def test_a_resume_re_runs_steps_under_new_keys(keys):
    """Resuming re-runs the steps after the checkpoint with the same numbers. It is a new run (new run id,
    no saved channel state): new pair keys, so the re-run steps open and the killed run's ciphertexts do not."""
    killed_a, killed_b = channel_pair(keys, run_id=7)
    killed = {step: killed_a.seal(1, step, 3, block(step)) for step in range(6)}
    for step in range(6):
        killed_b.open(0, step, 3, killed[step], block(step))
    resumed_a, resumed_b = channel_pair(keys, run_id=8)
    for step in (4, 5):  # re-run after a checkpoint at step 3
        with pytest.raises(SecurityError, match="failed authentication"):
            resumed_b.open(0, step, 3, killed[step], block(step))
        resumed_b.open(0, step, 3, resumed_a.seal(1, step, 3, block(step)), block(step))


def test_keys_command_writes_owner_only_private_keys_and_never_overwrites(tmp_path, capsys):
    from deca_flower.cli import main

    out = tmp_path / "keys"
    assert main(["keys", "--nodes", "2", "--out", str(out)]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    for pid in (0, 1):
        assert stat.S_IMODE((out / f"node_{pid}.pem").stat().st_mode) == 0o600
    before = (out / "node_0.pem").read_bytes()
    assert main(["keys", "--nodes", "3", "--out", str(out)]) == 2  # a site's identity is never replaced
    assert "already holds ['node_0.pem', 'node_1.pem', 'trusted.json']" in capsys.readouterr().err
    assert (out / "node_0.pem").read_bytes() == before and not (out / "node_2.pem").exists()
