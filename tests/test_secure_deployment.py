"""Secure mode, once, for real: TLS on the SuperLink (throwaway CA made with `cryptography`) and
SuperNode authentication (only registered EC keys may join). A tiny DECA job runs over it; a
SuperNode whose key was not registered is refused."""

from __future__ import annotations

import datetime
import ipaddress
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from deca_flower.flower.loopback import Loopback

ROOT = Path(__file__).resolve().parent.parent


def write_tls(folder):
    """A CA and a server certificate for 127.0.0.1 / localhost signed by it."""
    folder.mkdir()
    now = datetime.datetime.now(datetime.UTC)
    ca_key, server_key = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deca-flower test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                          x509.DNSName("localhost")]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (folder / "ca.crt").write_bytes(ca.public_bytes(pem))
    (folder / "server.pem").write_bytes(server.public_bytes(pem))
    (folder / "server.key").write_bytes(server_key.private_bytes(
        pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    return folder


def write_node_key(folder, name):
    """A SuperNode key pair in the OpenSSH format Flower 1.41 expects (NIST EC curve)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / f"{name}", folder / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private, public


@pytest.mark.deployment
def test_tls_and_supernode_auth_run_deca_and_refuse_an_unregistered_node(tmp_path):
    federation = Loopback(tmp_path, tls=write_tls(tmp_path / "tls"), supernode_auth=True)
    keys = tmp_path / "keys"
    keys.mkdir()
    try:
        federation.start_superlink()
        for pid in range(2):
            private, public = write_node_key(keys, f"node{pid}")
            registered = federation.flwr("supernode", "register", str(public), "loopback", timeout=120)
            assert registered.returncode == 0, registered.stdout + registered.stderr
            federation.start_supernode(f"supernode{pid}", f"partition-id={pid} num-partitions=2", private)
        intruder, _ = write_node_key(keys, "intruder")  # never registered
        intruding = federation.start_supernode("intruder", "partition-id=0 num-partitions=2", intruder)
        overrides = (f"model='tiny-random' num-nodes=2 topology='complete' steps-per-block=2 batch-size=2 "
                     f"max-text-tokens=16 eval-samples=20 eval-batch-size=10 lr=0.001 eval-every-blocks=0 "
                     f"node-wait-s=120 run-name='secure' results-dir='{tmp_path / 'runs'}' state-dir='{tmp_path / 'nodes'}'")
        run = federation.flwr("run", str(ROOT), "loopback", "--stream", "--run-config", overrides)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        summary = json.loads((tmp_path / "runs" / "secure" / "summary.json").read_text())
        assert len(summary["final"]["accuracy_per_node"]) == 2
        listed = federation.flwr("supernode", "list", "loopback", "--format", "json", timeout=120)
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert [n["status"] for n in json.loads(listed.stdout)["nodes"]] == ["online", "online"]  # not the intruder
        intruding.wait(timeout=120)  # it gives up: the SuperLink never activates an unregistered key
        assert intruding.returncode != 0 and "Failed to activate SuperNode" in federation.log("intruder")
    finally:
        federation.stop()
