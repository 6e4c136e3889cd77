"""TLS straight from the server (--ssl-keyfile/--ssl-certfile, client certificates with --ssl-ca-certs
and --ssl-cert-reqs 2) on a self-signed certificate made here, behind a path-prefixing proxy's
--root-path, with an API key: reached with httpx."""

from __future__ import annotations

import datetime
import importlib.util
import ipaddress
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import FAST_STEPS, RemoteServer

KEY = "tls-test-key"
ROOT = "/canvas"


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) PEM files for 127.0.0.1 and localhost, made with the `cryptography` package
    if installed, else the openssl command; skips when neither is there."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if importlib.util.find_spec("cryptography") is not None:
        _with_cryptography(cert, key)
    elif shutil.which("openssl"):
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
                *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
                *("-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            ],
            check=True,
            capture_output=True,
            timeout=60,
        )
    else:
        pytest.skip("neither the cryptography package nor the openssl command is here to make a certificate")
    return cert, key


def _with_cryptography(cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    alt_names = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(alt_names, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def client_context(cert: Path, key: Path | None) -> ssl.SSLContext:
    """Trusts `cert`; presents it as the client certificate when `key` is given."""
    context = ssl.create_default_context(cafile=str(cert))
    if key is not None:
        context.load_cert_chain(cert, key)
    return context


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls_server(tiny_model_dir: Path, certificate: tuple[Path, Path]) -> Iterator[RemoteServer]:
    cert, key = certificate
    flags = ["--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--ssl-ca-certs", str(cert)]
    flags += ["--ssl-cert-reqs", "2", "--root-path", ROOT, "--api-key", KEY]
    remote = RemoteServer(tiny_model_dir, *flags, log_name="tls")
    remote.tls = client_context(cert, key)
    with remote:
        yield remote


def test_https_with_a_trusted_certificate_and_a_client_certificate(
    tls_server: RemoteServer, certificate: tuple[Path, Path]
) -> None:
    assert tls_server.url.startswith("https://")
    with httpx.Client(base_url=tls_server.url, verify=client_context(*certificate), timeout=120) as client:
        assert client.get("/ready").status_code == 200
        auth = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models").status_code == 401
        models = client.get("/v1/models", headers=auth)
        assert models.status_code == 200 and models.json()["data"][0]["id"] == tls_server.model_name
        body = {"prompt": "hi", "max_tokens": 8, "max_denoising_steps": FAST_STEPS}
        completion = client.post("/v1/completions", json=body, headers=auth)
        assert completion.status_code == 200, completion.text
        # uvicorn's --root-path is for a proxy that strips the prefix: the server sees /v1/models, and
        # links it makes (the OpenAPI servers) carry the prefix.
        assert client.get("/openapi.json", headers=auth).json()["servers"] == [{"url": ROOT}]


def test_plain_http_an_untrusted_certificate_or_no_client_certificate_get_nowhere(
    tls_server: RemoteServer, certificate: tuple[Path, Path]
) -> None:
    cert, _ = certificate
    plain = tls_server.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/ready", timeout=10)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.url}/ready", timeout=10)  # the system's CAs do not know this certificate
    with pytest.raises(httpx.TransportError):  # --ssl-cert-reqs 2: a client without a certificate
        httpx.get(f"{tls_server.url}/ready", verify=client_context(cert, None), timeout=10)
