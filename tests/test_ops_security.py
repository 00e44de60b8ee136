"""Security: DICOM TLS in and out, calling-AE and source-address allow-lists, secrets in config files,
and the audit trail — over real associations on loopback, with a throwaway CA made at test time."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import free_port, storescu
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pynetdicom import AE, evt
from pynetdicom.sop_class import MRImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.config import DestinationConfig, load_config
from dicom_node.delivery.cstore import echo, send_files
from dicom_node.devtools.phantoms import make_lumbar_mr
from dicom_node.errors import ConfigError
from dicom_node.log import phi_hash
from dicom_node.network.tls import server_context
from dicom_node.node import ReceivingNode


# ---------------------------------------------------------------------------------------------- a throwaway PKI
@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
          *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False),
                            critical=True)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                         x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, other_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Test Hospital CA", ca_key, "Test Hospital CA", ca_key, ca=True)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out: dict[str, Path] = {}
    for name, issuer, ikey, server in [("server", "Test Hospital CA", ca_key, True),
                                       ("client", "Test Hospital CA", ca_key, False),
                                       ("rogue", "Rogue CA", other_key, False)]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(f"{name}.test", key, issuer, ikey, server=server)
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(d / f"{name}.key", key)
        out[name] = d
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key",
               d / "rogue.pem", d / "rogue.key")


def _client_ctx(pki: Pki, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None and key is not None:
        ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _node(tmp_path: Path, **tables: Any) -> ReceivingNode:
    node_t = {"port": 0, "host": "127.0.0.1", "data_dir": tmp_path / "data", "min_free_disk_mb": 0,
              **tables.pop("node", {})}
    cfg = load_config(node=node_t, http={"enabled": False}, audit={"flush_interval_s": 0.05}, **tables)
    n = ReceivingNode(cfg)
    n.start()
    return n


def _echo(port: int, *, calling: str = "PYSCU", tls: tuple[ssl.SSLContext, str] | None = None) -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINEMED", tls_args=tls)
    ok = assoc.is_established
    if ok:
        status = assoc.send_c_echo()
        assoc.release()
        assert status.Status == 0x0000
    return assoc


def _audit(node: ReceivingNode) -> list[dict[str, Any]]:
    assert node.receiver.flush(), "acknowledged instances recorded"
    node.receiver.audit.flush()
    path = node.config.audit_path
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ---------------------------------------------------------------------------------------------- TLS listener
@pytest.fixture
def tls_node(tmp_path: Path, pki: Pki) -> Iterator[ReceivingNode]:
    n = _node(tmp_path, tls={"enabled": True, "cert_file": pki.server_cert, "key_file": pki.server_key,
                             "ca_file": pki.ca, "require_client_cert": True})
    yield n
    n.stop()


def test_tls_association_accepted_with_the_right_certificate(tls_node: ReceivingNode, pki: Pki,
                                                             tmp_path: Path) -> None:
    port = tls_node.receiver.port
    assoc = _echo(port, tls=(_client_ctx(pki, pki.client_cert, pki.client_key), "localhost"))
    assert assoc.is_established or assoc.is_released
    # a study over TLS (pynetdicom SCU with the client certificate) is stored
    study = make_lumbar_mr(tmp_path / "mr", slices=2, size=32)
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINEMED",
                         tls_args=(_client_ctx(pki, pki.client_cert, pki.client_key), "localhost"))
    assert assoc.is_established
    statuses = [assoc.send_c_store(p).Status for p in study.paths]
    assoc.release()
    assert statuses == [0x0000] * len(study.paths)
    assert tls_node.receiver.flush(), "acknowledged instances recorded"
    assert len(tls_node.store.instances(study.study_instance_uid)) == len(study.paths)


@pytest.mark.parametrize("who", ["no client certificate", "certificate from another CA", "plain TCP"])
def test_tls_association_refused_without_a_valid_certificate(tls_node: ReceivingNode, pki: Pki, who: str) -> None:
    port = tls_node.receiver.port
    tls: tuple[ssl.SSLContext, str] | None
    if who == "no client certificate":
        tls = (_client_ctx(pki, None, None), "localhost")
    elif who == "certificate from another CA":
        tls = (_client_ctx(pki, pki.rogue_cert, pki.rogue_key), "localhost")
    else:
        tls = None
    assoc = _echo(port, tls=tls)
    assert not assoc.is_established and not assoc.is_released
    # and the listener is still fine for a good client afterwards
    good = _echo(port, tls=(_client_ctx(pki, pki.client_cert, pki.client_key), "localhost"))
    assert good.is_released


def test_storescu_plain_is_refused_by_tls_listener(tls_node: ReceivingNode, tmp_path: Path) -> None:
    study = make_lumbar_mr(tmp_path / "mr", slices=1, size=32)
    res = storescu(tls_node.receiver.port, list(study.paths))
    assert res.returncode != 0
    assert tls_node.store.jobs() == []


# ---------------------------------------------------------------------------------------------- TLS exports
@pytest.fixture
def tls_destination(pki: Pki) -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom SCP speaking TLS only, requiring our client certificate."""
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    ctx.load_verify_locations(str(pki.ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    ae = AE(ae_title="TLSPACS")
    ae.add_supported_context(Verification)
    from pynetdicom import AllStoragePresentationContexts

    ae.supported_contexts = [*ae.supported_contexts, *AllStoragePresentationContexts]
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, ssl_context=ctx,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert server is not None
    yield port, received
    server.shutdown()


def test_export_over_tls_with_client_certificate(tls_destination: tuple[int, list[str]], pki: Pki,
                                                 tmp_path: Path) -> None:
    port, received = tls_destination
    study = make_lumbar_mr(tmp_path / "mr", slices=2, size=32)
    good = DestinationConfig(name="pacs", ae_title="TLSPACS", host="127.0.0.1", port=port, tls=True,
                             tls_ca_file=pki.ca, tls_cert_file=pki.client_cert, tls_key_file=pki.client_key,
                             tls_server_name="localhost")
    assert echo(good, calling_ae="SPINEMED") == (True, "C-ECHO success")
    results = send_files(good, list(study.paths), calling_ae="SPINEMED", timeout_s=10)
    assert all(r.delivered for r in results)
    assert sorted(received) == sorted(str(pydicom.dcmread(p).SOPInstanceUID) for p in study.paths)
    # without our certificate, or without trusting its CA, nothing goes out and the reason says so
    no_cert = good.model_copy(update={"tls_cert_file": None, "tls_key_file": None})
    untrusted = good.model_copy(update={"tls_ca_file": None})
    plain = good.model_copy(update={"tls": False})
    for dest in (no_cert, untrusted, plain):
        before = len(received)
        res = send_files(dest, list(study.paths)[:1], calling_ae="SPINEMED", timeout_s=5)
        assert not res[0].delivered and res[0].error, dest
        assert len(received) == before


def test_world_readable_key_is_refused(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "open.key"
    key.write_bytes(pki.server_key.read_bytes())
    key.chmod(0o644)
    cfg = load_config(tls={"enabled": True, "cert_file": pki.server_cert, "key_file": key})
    with pytest.raises(ConfigError, match=f"private key {key} is readable by every user"):
        server_context(cfg.tls)


# ---------------------------------------------------------------------------------------------- allow-lists
def test_calling_ae_not_on_the_allow_list_is_refused(tmp_path: Path) -> None:
    n = _node(tmp_path, node={"allowed_calling_aes": ["MODALITY1"]})
    try:
        assert _echo(n.receiver.port, calling="MODALITY1").is_released
        bad = _echo(n.receiver.port, calling="INTRUDER")
        assert bad.is_rejected
        time.sleep(0.2)
        lines = [a for a in _audit(n) if a["event"] == "association_rejected"]
        assert lines and lines[-1]["calling_ae"] == "INTRUDER" and lines[-1]["reason"] == "calling_ae"
        assert n.receiver.gate.stats.snapshot() == {"calling_ae": 1}
    finally:
        n.stop()


def test_source_address_allow_list(tmp_path: Path) -> None:
    n = _node(tmp_path / "a", node={"allowed_source_networks": ["10.0.0.0/8", "192.168.7.0/24"]})
    try:
        assoc = _echo(n.receiver.port)
        assert assoc.is_rejected, "127.0.0.1 is outside every allowed network"
        rj = assoc.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x01)  # permanent, service user
        lines = [a for a in _audit(n) if a["event"] == "association_rejected"]
        assert lines[-1]["reason"] == "source_address" and lines[-1]["peer_ip"] == "127.0.0.1"
    finally:
        n.stop()
    n = _node(tmp_path / "b", node={"allowed_source_networks": ["127.0.0.0/8"]})
    try:
        assert _echo(n.receiver.port).is_released
    finally:
        n.stop()


# ---------------------------------------------------------------------------------------------- secrets in config
def test_world_readable_config_with_secrets_is_refused(tmp_path: Path, pki: Pki) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[tls]\nenabled = true\ncert_file = "{pki.server_cert}"\nkey_file = "{pki.server_key}"\n')
    cfg.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    msg = str(info.value)
    assert str(cfg) in msg and "tls.key_file" in msg and "readable by every user" in msg and "0644" in msg
    cfg.chmod(0o640)
    assert load_config(cfg).tls.enabled
    db = tmp_path / "db.toml"
    db.write_text('[store]\nurl = "postgresql://spinemed:hunter2@db.example.org/spinemed"\n')
    db.chmod(0o604)
    with pytest.raises(ConfigError, match=r"store\.url"):
        load_config(db)
    # no secrets: any mode is fine
    plain = tmp_path / "plain.toml"
    plain.write_text("[node]\nport = 104\n")
    plain.chmod(0o644)
    assert load_config(plain).node.port == 104


# ---------------------------------------------------------------------------------------------- audit trail
def test_audit_trail_records_who_sent_what_without_phi(tmp_path: Path) -> None:
    n = _node(tmp_path)
    try:
        study = make_lumbar_mr(tmp_path / "mr", slices=3, size=32)
        assert storescu(n.receiver.port, list(study.paths), calling="CT-SCANNER-3").returncode == 0
        assert n.receiver.flush(), "acknowledged instances recorded and audited"
        lines = [a for a in _audit(n) if a["event"] == "instance_received"]
    finally:
        n.stop()
    assert len(lines) == len(study.paths)
    assert {a["calling_ae"] for a in lines} == {"CT-SCANNER-3"}
    assert {a["peer_ip"] for a in lines} == {"127.0.0.1"}
    assert {a["study"] for a in lines} == {phi_hash(study.study_instance_uid)}
    assert {a["outcome"] for a in lines} == {"stored"} and {a["status"] for a in lines} == {"0x0000"}
    raw = n.config.audit_path.read_text()
    ds = pydicom.dcmread(study.paths[0], stop_before_pixels=True)
    for phi in (study.study_instance_uid, str(ds.PatientID), str(ds.PatientName), str(ds.SOPInstanceUID)):
        assert phi not in raw
    assert oct(n.config.audit_path.stat().st_mode & 0o777) == "0o640"
