"""Certificate, key, CA and OCSP files, read and checked once, with one-line errors.

Every check raises ``TlsFileError`` whose message starts with the key that named the file
(``cert: /etc/ik/web.pem expired on 2025-01-01 00:00 UTC``), so that the config loader can put
the full path in front (``listeners[0].tls.cert: ...``). What is checked is what would
otherwise fail at the first handshake, or worse, at the first handshake after a reload: the
file is there and readable, holds what it should (PEM certificates, an unencrypted private
key, a DER OCSP response), the certificate is valid now, the key is the certificate's, and
OpenSSL itself accepts the pair.
"""

from __future__ import annotations

import hashlib
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime

# Certificates, keys and CA bundles are small; a larger file is a mistake (or a hostile one).
MAX_FILE_BYTES = 1024 * 1024


class TlsFileError(ValueError):
    """A TLS file that cannot be used; the message starts with the key that named it."""


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What the proxy needs to know of a certificate: the names it serves and its dates."""

    path: str
    # DNS names (subjectAltName, else the subject's CN), lower-case; "*.example.com" kept.
    names: tuple[str, ...]
    ips: tuple[str, ...]
    not_before: float
    not_after: float
    key_type: str  # "ec", "rsa", "ed25519", "ed448" (or "other")
    serial: int
    sha256: str  # of the leaf's DER, to tell a changed file from a touched one


def read_file(path: str, field: str) -> bytes:
    """The bytes of ``path``; TlsFileError naming ``field`` when it cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise TlsFileError(f"{field}: cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE_BYTES:
        raise TlsFileError(f"{field}: {path} is larger than 1 MiB")
    if not data.strip():
        raise TlsFileError(f"{field}: {path} is empty")
    return data


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def check_certificates(path: str, field: str = "ca") -> int:
    """A PEM bundle of one or more certificates (a CA file); returns how many it holds."""
    from cryptography import x509

    data = read_file(path, field)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsFileError(f"{field}: {path} holds no PEM certificate") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        ctx.load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise TlsFileError(f"{field}: OpenSSL refuses {path}: {exc.reason or exc}") from None
    return len(certs)


def check_pair(
    cert: str,
    key: str,
    *,
    now: float | None = None,
    cert_field: str = "cert",
    key_field: str = "key",
) -> CertInfo:
    """A certificate (with its chain) and its private key, valid at ``now``."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    now = time.time() if now is None else now
    cert_data = read_file(cert, cert_field)
    key_data = read_file(key, key_field)
    try:
        chain = x509.load_pem_x509_certificates(cert_data)
    except ValueError:
        raise TlsFileError(f"{cert_field}: {cert} holds no PEM certificate") from None
    leaf = chain[0]
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    if not_after < now:
        raise TlsFileError(f"{cert_field}: {cert} expired on {_when(not_after)}")
    if not_before > now:
        raise TlsFileError(f"{cert_field}: {cert} is not valid before {_when(not_before)}")
    try:
        private = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise TlsFileError(
            f"{key_field}: {key} is encrypted (give the key without a passphrase)"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TlsFileError(f"{key_field}: {key} holds no PEM private key") from None
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise TlsFileError(f"{key_field}: {key} is not the key of the certificate in {cert}")
    # OpenSSL has the last word: what it refuses here it would refuse at start-up.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsFileError(f"{cert_field}: OpenSSL refuses {cert}: {exc.reason or exc}") from None
    key_type = {
        ec.EllipticCurvePrivateKey: "ec",
        rsa.RSAPrivateKey: "rsa",
        ed25519.Ed25519PrivateKey: "ed25519",
        ed448.Ed448PrivateKey: "ed448",
    }
    kind = next((name for cls, name in key_type.items() if isinstance(private, cls)), "other")
    names: list[str] = []
    ips: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    if not names and not ips:
        cns = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        names = [str(cn.value).lower() for cn in cns]
    return CertInfo(
        path=cert,
        names=tuple(names),
        ips=tuple(ips),
        not_before=not_before,
        not_after=not_after,
        key_type=kind,
        serial=leaf.serial_number,
        sha256=hashlib.sha256(leaf.public_bytes(der)).hexdigest(),
    )


def check_ocsp(
    path: str, info: CertInfo, *, now: float | None = None, field: str = "ocsp"
) -> bytes:
    """A DER OCSP response for the certificate ``info`` describes, current at ``now``:
    what is stapled to handshakes of clients that ask for the certificate's status."""
    from cryptography.x509 import ocsp

    now = time.time() if now is None else now
    data = read_file(path, field)
    try:
        response = ocsp.load_der_ocsp_response(data)
    except ValueError:
        raise TlsFileError(f"{field}: {path} is not a DER OCSP response") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        status = response.response_status.name.lower()
        raise TlsFileError(f"{field}: {path} is an unsuccessful OCSP response ({status})")
    if response.serial_number != info.serial:
        raise TlsFileError(f"{field}: {path} answers for another certificate than {info.path}")
    if response.certificate_status != ocsp.OCSPCertStatus.GOOD:
        status = response.certificate_status.name.lower()
        raise TlsFileError(f"{field}: {path} says the certificate is {status}")
    next_update = response.next_update_utc
    if next_update is not None and next_update.timestamp() < now:
        raise TlsFileError(f"{field}: {path} expired on {_when(next_update.timestamp())}")
    return data
