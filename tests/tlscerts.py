"""Certificates made at test time (no private key is committed).

:func:`make_pki` writes into a directory: two CAs (``ca.pem`` and an
unrelated ``other-ca.pem``), a server certificate signed by the first for
``127.0.0.1`` and ``localhost`` (``server.pem``/``server.key``), a client
certificate signed by it (``client.pem``/``client.key``), and one signed by
the other CA (``stranger.pem``/``stranger.key``). Keys are ECDSA P-256,
written mode 0600.
"""

import datetime
import ipaddress
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_KEY = ec.EllipticCurvePrivateKey


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _certificate(subject: str, key: _KEY, issuer: Optional[Tuple[x509.Certificate, _KEY]],
                 sans: List[x509.GeneralName], ca: bool, usage: Optional[x509.ObjectIdentifier]
                 ) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(issuer[0].subject if issuer else _name(subject))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False,
                          key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    signer = issuer[1] if issuer else key
    return builder.sign(signer, hashes.SHA256())


@dataclass(frozen=True)
class PKI:
    """Paths of the files :func:`make_pki` wrote."""

    directory: str

    def __getitem__(self, name: str) -> str:
        return os.path.join(self.directory, name)


def _write(path: str, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: _KEY) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_pki(directory: str, server_names: Tuple[str, ...] = ("127.0.0.1", "localhost")) -> PKI:
    """Write the CAs, the server, client and stranger certificates into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    pki = PKI(directory)
    cas = {}
    for name in ("ca", "other-ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"tigertunnel test {name}", key, None, [], True, None)
        cas[name] = (cert, key)
        _write(pki[f"{name}.pem"], _pem(cert), 0o644)
    sans: List[x509.GeneralName] = []
    for host in server_names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    for name, ca, names, usage in (
            ("server", "ca", sans, ExtendedKeyUsageOID.SERVER_AUTH),
            ("client", "ca", [], ExtendedKeyUsageOID.CLIENT_AUTH),
            ("stranger", "other-ca", [], ExtendedKeyUsageOID.CLIENT_AUTH)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"tigertunnel test {name}", key, cas[ca], names, False, usage)
        _write(pki[f"{name}.pem"], _pem(cert), 0o644)
        _write(pki[f"{name}.key"], _key_pem(key), 0o600)
    return pki
