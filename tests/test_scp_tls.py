"""TLS on the listener: certificates made by the test with the openssl CLI, pynetdicom as the TLS client."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.ingest_support import node_settings, running_node, sender_ae


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_pki(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    p = {name: folder / name for name in ("ca.key", "ca.pem", "server.key", "server.pem", "client.key", "client.pem")}
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        str(p["ca.key"]),
        "-out",
        str(p["ca.pem"]),
        "-days",
        "2",
        "-subj",
        "/CN=edgenode test CA",
    )
    ext = folder / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for who, subject, extra in (("server", "/CN=localhost", ["-extfile", str(ext)]), ("client", "/CN=SENDER", [])):
        csr = folder / f"{who}.csr"
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(p[f"{who}.key"]), "-out", str(csr), "-subj", subject
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(p["ca.pem"]),
            "-CAkey",
            str(p["ca.key"]),
            "-CAcreateserial",
            "-out",
            str(p[f"{who}.pem"]),
            "-days",
            "2",
            *extra,
        )
    return p


def client_context(pki: dict[str, Path], with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca.pem"]))
    if with_certificate:
        context.load_cert_chain(str(pki["client.pem"]), str(pki["client.key"]))
    return context


def test_tls_with_client_certificate_verification(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"tls_cert": str(pki["server.pem"]), "tls_key": str(pki["server.key"]), "tls_ca": str(pki["ca.pem"])}
    with running_node(node_settings(tmp_path / "var", node=tls)) as node:
        port = node.scp.port
        assoc = sender_ae().associate(
            "127.0.0.1", port, ae_title="EDGENODE", tls_args=(client_context(pki, True), "localhost")
        )
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()

        no_cert = sender_ae().associate(
            "127.0.0.1", port, ae_title="EDGENODE", tls_args=(client_context(pki, False), "localhost")
        )
        assert not no_cert.is_established

        plain = sender_ae().associate("127.0.0.1", port, ae_title="EDGENODE")  # no TLS at all
        assert not plain.is_established


def test_tls_without_client_verification_accepts_any_tls_client(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    tls = {"tls_cert": str(pki["server.pem"]), "tls_key": str(pki["server.key"])}
    with running_node(node_settings(tmp_path / "var", node=tls)) as node:
        assoc = sender_ae().associate(
            "127.0.0.1", node.scp.port, ae_title="EDGENODE", tls_args=(client_context(pki, False), "localhost")
        )
        assert assoc.is_established
        assert int(assoc.send_c_echo().Status) == 0
        assoc.release()
