"""TLS for the metrics endpoint: certificate, key and CA files, read and checked.

``--metrics-tls-cert FILE --metrics-tls-key FILE`` serve ``--metrics`` over
HTTPS; ``--metrics-tls-client-ca FILE`` also requires every client to show a
certificate signed by one of the CAs in FILE (mutual TLS), which makes the
endpoint authenticated. ``tigertunnel status https://...`` checks the
endpoint's certificate against ``--ca FILE`` and its host name or IP address
with service-identity (Twisted's ``optionsForClientTLS``), and shows a client
certificate with ``--cert FILE --key FILE``.

Files are PEM. A certificate file holds the certificate first, then any
intermediate certificates; a CA file holds one or more CA certificates. A
private key file follows the rules of every secret file
(:func:`tigertunnel.keys.files.read_key_file`: no access for group or
others, owned by this user or root). Every problem is one
:class:`~tigertunnel.errors.ConfigError` line naming the file; no key
material is ever logged.

Twisted's TLS needs pyOpenSSL (``pip install 'twisted[tls]'``, which
tigertunnel's requirements include); without it these options say so.
"""

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, List, Optional

from tigertunnel.errors import ConfigError, KeyFileError
from tigertunnel.keys.files import read_key_file

if TYPE_CHECKING:
    from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
    from twisted.internet.ssl import Certificate, CertificateOptions, PrivateCertificate

#: A PEM certificate block.
_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)
#: Certificates, CA and key files are small; this bounds a mistaken path.
MAX_PEM_FILE_SIZE = 1 << 20


def _ssl() -> Any:
    """``twisted.internet.ssl``, or a ConfigError saying what is missing."""
    try:
        from twisted.internet import ssl
        ssl.CertificateOptions  # noqa: B018 (absent without pyOpenSSL)
    except (ImportError, AttributeError):
        raise ConfigError("TLS needs pyOpenSSL, which is not installed: "
                          "pip install 'twisted[tls]'") from None
    return ssl


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_PEM_FILE_SIZE + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path!r}: "
                          f"{e.strerror or e}") from None
    if len(data) > MAX_PEM_FILE_SIZE:
        raise ConfigError(f"{what} {path!r} is larger than "
                          f"{MAX_PEM_FILE_SIZE} bytes: not a PEM file")
    return data


def read_certificates(path: str, what: str = "certificate file") -> "List[Certificate]":
    """The PEM certificates in ``path``, in order (at least one).

    :raises ConfigError: unreadable, no certificate, or one that does not parse.
    """
    ssl = _ssl()
    blocks = _PEM_CERTIFICATE.findall(_read(path, what))
    if not blocks:
        raise ConfigError(f"{what} {path!r} holds no PEM certificate "
                          f"(-----BEGIN CERTIFICATE-----)")
    certificates = []
    for number, block in enumerate(blocks, 1):
        try:
            certificates.append(ssl.Certificate.loadPEM(block))
        except Exception as e:  # pyOpenSSL's errors have no common base
            raise ConfigError(f"{what} {path!r}: certificate {number} does not "
                              f"parse ({type(e).__name__})") from None
    return certificates


def read_private_certificate(cert_path: str, key_path: str,
                             owners: Optional[Iterable[int]] = None,
                             leaf: "Optional[Certificate]" = None) -> "PrivateCertificate":
    """The certificate of ``cert_path`` with the private key of ``key_path``.

    :param owners: the users the key file may belong to
        (:func:`tigertunnel.keys.files.trusted_owners` by default).
    :param leaf: the certificate, when ``cert_path`` has been read already.
    :raises ConfigError: either file is unusable, the key file is readable
        by others or belongs to another user, or the key is not the
        certificate's.
    """
    ssl = _ssl()
    if leaf is None:
        leaf = read_certificates(cert_path)[0]
    try:
        key_pem = read_key_file(key_path, secret=True, owners=owners)
    except KeyFileError as e:
        raise ConfigError(f"TLS key file: {e}") from None
    if b"PRIVATE KEY-----" not in key_pem:
        raise ConfigError(f"TLS key file {key_path!r} holds no PEM private "
                          f"key (-----BEGIN PRIVATE KEY-----)")
    leaf_pem = leaf.dumpPEM()
    try:
        # Loads the key and checks that it is the certificate's.
        private: "PrivateCertificate" = ssl.PrivateCertificate.loadPEM(
            leaf_pem + b"\n" + key_pem)
    except Exception:  # never show the content
        raise ConfigError(f"TLS key file {key_path!r} is not the private key "
                          f"of the certificate in {cert_path!r}") from None
    return private


@dataclass(frozen=True)
class ServerTLS:
    """What a TLS listener serves with, read and checked at start-up.

    :ivar certificate: the certificate and its key.
    :ivar chain: intermediate certificates sent after it.
    :ivar client_cas: when not empty, every client must show a certificate
        signed by one of these.
    """

    certificate: "PrivateCertificate" = field(repr=False)
    chain: "List[Certificate]" = field(default_factory=list, repr=False)
    client_cas: "List[Certificate]" = field(default_factory=list, repr=False)

    @property
    def requires_client_certificate(self) -> bool:
        """Whether clients must authenticate."""
        return bool(self.client_cas)

    def options(self) -> "CertificateOptions":
        """Twisted's server context factory for these files."""
        ssl = _ssl()
        extra = {}
        if self.client_cas:
            extra["trustRoot"] = ssl.trustRootFromCertificates(self.client_cas)
        options: "CertificateOptions" = ssl.CertificateOptions(
            privateKey=self.certificate.privateKey.original,
            certificate=self.certificate.original,
            extraCertChain=[c.original for c in self.chain], **extra)
        return options


def read_server_tls(cert_path: str, key_path: str, client_ca_path: Optional[str] = None,
                    owners: Optional[Iterable[int]] = None) -> ServerTLS:
    """Read the files of ``--metrics-tls-cert``, ``-key`` and ``-client-ca``.

    :raises ConfigError: one line naming the unusable file.
    """
    certificates = read_certificates(cert_path)
    private = read_private_certificate(cert_path, key_path, owners, certificates[0])
    chain = certificates[1:]
    cas = (read_certificates(client_ca_path, "client CA file")
           if client_ca_path is not None else [])
    return ServerTLS(private, chain, cas)


def client_tls(hostname: str, ca_path: Optional[str], cert_path: Optional[str] = None,
               key_path: Optional[str] = None,
               owners: Optional[Iterable[int]] = None) -> "IOpenSSLClientConnectionCreator":
    """The TLS client of ``tigertunnel status https://HOSTNAME...``.

    The server's certificate must chain to a CA of ``ca_path`` (the
    system's trusted CAs when ``None``) and name ``hostname`` (a DNS name or
    an IP address, checked by service-identity); with ``cert_path`` and
    ``key_path`` the client shows that certificate.

    :raises ConfigError: one line naming the unusable file.
    """
    ssl = _ssl()
    trust = (ssl.trustRootFromCertificates(read_certificates(ca_path, "CA file"))
             if ca_path is not None else None)
    mine = (read_private_certificate(cert_path, key_path, owners)
            if cert_path is not None and key_path is not None else None)
    creator: "IOpenSSLClientConnectionCreator" = ssl.optionsForClientTLS(
        hostname, trustRoot=trust, clientCertificate=mine)
    return creator
