"""Certificates for tests, made with the openssl command: a CA (``openssl ca``, so that it
keeps the index an OCSP responder needs), server certificates for given names with ECDSA P-256
or RSA 2048 keys, client certificates, expired ones, and OCSP responses for any of them."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

from tests.conftest import require_tool

_CA_CONFIG = """\
[ca]
default_ca = ik_ca
[ik_ca]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir/issued
serial = $dir/serial
default_md = sha256
policy = any_name
unique_subject = no
email_in_dn = no
[any_name]
commonName = supplied
"""


class Issued:
    """A certificate file and its key file."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key


class TestCA:
    """A certificate authority in ``directory``."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "interknit-test-ca") -> None:
        self.openssl = require_tool("openssl")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "issued").mkdir(exist_ok=True)
        (directory / "index.txt").write_text("")
        (directory / "serial").write_text("1000\n")
        self.config = directory / "ca.cnf"
        self.config.write_text(_CA_CONFIG.format(dir=directory))
        self.cert, self.key = directory / "ca.pem", directory / "ca.key"
        # Python 3.13 verifies with VERIFY_X509_STRICT: a CA needs its key usage, a leaf the
        # key identifier of the CA that signed it (as real CAs issue them).
        self.run("req", "-x509", *self._newkey("ec"), "-days", "400", "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign",
                 "-addext", "subjectKeyIdentifier=hash",
                 "-keyout", str(self.key), "-out", str(self.cert))  # fmt: skip
        self._count = 0

    def run(self, *args: str, input: bytes | None = None) -> bytes:
        done = subprocess.run([self.openssl, *args], check=False, capture_output=True, input=input)
        if done.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} failed: {done.stderr.decode(errors='replace')}")
        return done.stdout

    @staticmethod
    def _newkey(kind: str) -> list[str]:
        if kind == "rsa":
            return ["-newkey", "rsa:2048", "-nodes"]
        return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def issue(
        self,
        name: str,
        *,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = ("127.0.0.1",),
        kind: str = "ec",
        usage: str = "serverAuth",
        start: str | None = None,
        end: str | None = None,
        days: int = 2,
        revocation_urls: bool = False,
        file_name: str | None = None,
    ) -> Issued:
        """A leaf for ``name`` (its CN), with these DNS names and addresses in its
        subjectAltName; ``start``/``end`` as ``YYYYMMDDHHMMSSZ`` (default: now, for two days)."""
        self._count += 1
        base = file_name or f"{name.replace('*', 'star')}-{kind}-{self._count}"
        key, csr, pem = (self.dir / f"{base}.{ext}" for ext in ("key", "csr", "pem"))
        ext = self.dir / f"{base}.ext"
        alt = [f"DNS:{d}" for d in dns] + [f"IP:{ip}" for ip in ips]
        lines = [
            f"extendedKeyUsage={usage}",
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature" + (",keyEncipherment" if kind == "rsa" else ""),
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid,issuer",
        ]
        if alt:
            lines.insert(0, "subjectAltName=" + ",".join(alt))
        if revocation_urls:
            # As a public CA's leaf has them (testssl.sh rates a leaf without them HIGH).
            lines.append("authorityInfoAccess=OCSP;URI:http://ocsp.example.com/")
            lines.append("crlDistributionPoints=URI:http://crl.example.com/ca.crl")
        ext.write_text("\n".join(lines) + "\n")
        self.run("req", *self._newkey(kind), "-subj", f"/CN={name}", "-keyout", str(key),
                 "-out", str(csr))  # fmt: skip
        dates = ["-startdate", start] if start else []
        dates += ["-enddate", end] if end else ["-days", str(days)]
        self.run("ca", "-batch", "-rand_serial", "-config", str(self.config),
                 "-cert", str(self.cert), "-keyfile", str(self.key), "-in", str(csr),
                 "-out", str(pem), "-notext", "-extfile", str(ext), *dates)  # fmt: skip
        return Issued(pem, key)

    def ocsp(self, leaf: Path, out: Path, *, revoke: bool = False) -> Path:
        """A DER OCSP response for ``leaf``, signed by the CA, good for a day."""
        if revoke:
            self.run("ca", "-config", str(self.config), "-cert", str(self.cert),
                     "-keyfile", str(self.key), "-revoke", str(leaf))  # fmt: skip
        request = out.with_suffix(".req")
        self.run("ocsp", "-issuer", str(self.cert), "-cert", str(leaf), "-no_nonce",
                 "-reqout", str(request))  # fmt: skip
        self.run("ocsp", "-index", str(self.dir / "index.txt"), "-rsigner", str(self.cert),
                 "-rkey", str(self.key), "-CA", str(self.cert), "-reqin", str(request),
                 "-respout", str(out), "-ndays", "1")  # fmt: skip
        return out

    def client_context(self, client: Issued | None = None) -> ssl.SSLContext:
        """A client context trusting this CA (with ``client`` as its certificate)."""
        ctx = ssl.create_default_context(cafile=str(self.cert))
        if client is not None:
            ctx.load_cert_chain(str(client.cert), str(client.key))
        return ctx
