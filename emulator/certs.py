"""A certificate authority per run: the KMEs' TLS certificates and the SAEs' client certificates.

Theory of operation
-------------------
Key management (ETSI GS QKD 014, Cisco SKIP) runs over mutual TLS: every KME serves
HTTPS with a certificate, every SAE (an application) presents a client certificate, and
the KME takes the caller's SAE id from the *verified* client certificate's subject
CommonName, never from the request. KMEs also sign their PQC key exchanges
(``nodes.kms.hybrid``) with the key of their KME certificate.

All of these chain to one throwaway CA made for the run (``RunCa.create``) and kept in
the run directory (``RunCa.save``: ``ca.pem`` and ``ca.key``, the key readable by its
owner only), so that ``qnetem certs RUN_DIR --sae ID`` can later issue a client
certificate for an application that wants to talk to a live run.

Profile (RFC 5280; ECDSA P-256 keys, signatures ecdsa-with-SHA256, RFC 5758 §3.2):

* CA: self-signed, subject ``CN=qnetem run CA <run>, O=qnetem``; basicConstraints
  cA=TRUE, pathLen=0, critical (§4.2.1.9); keyUsage keyCertSign + cRLSign (+
  digitalSignature), critical (§4.2.1.3); subject key identifier (§4.2.1.2); valid
  ``CA_VALIDITY`` from ``now - CLOCK_SKEW``.
* KME ``<node>``: ``CN=kme-<node>``; subjectAltName (§4.2.1.6) DNS ``localhost``,
  ``<node>``, ``node-<node>`` (the container host name) and IP ``127.0.0.1``;
  extKeyUsage serverAuth + clientAuth (§4.2.1.12; a KME is a client of its peers too).
* SAE ``<id>``: ``CN=<id>``; subjectAltName URI ``urn:qnetem:sae:<id>`` (the id
  percent-encoded where RFC 3986 §3.3 requires it); extKeyUsage clientAuth.
* Every leaf: basicConstraints cA=FALSE, critical; keyUsage digitalSignature, critical
  (all (EC)DHE suites sign with the certificate key); authority key identifier
  (§4.2.1.1); a random 159-bit serial (§4.1.2.2: positive, at most 20 octets); valid
  ``LEAF_VALIDITY`` from ``now - CLOCK_SKEW`` (the five minutes forgive clocks that lag
  the orchestrator's), never beyond the CA's notAfter.

Names. A CommonName has at most 64 characters (RFC 5280 Appendix A.1,
``ub-common-name``). SAE ids: 1..64 printable ASCII characters (0x20..0x7E), no '/'
(they name files), no leading or trailing space, and not starting with ``kme-`` (any
case): that prefix marks KME certificates, so an application can never hold a
certificate that names a KME (``nodes.kms.hybrid`` also requires serverAuth, which SAE
certificates lack). Node names also become DNS names and the CN ``kme-<node>``: they
match the scenario's name syntax ``[a-z0-9][a-z0-9-]*`` and have at most 60 characters
(64 - len("kme-")). Anything else raises ``CertError``.

Files. Private keys are PKCS #8 PEM, unencrypted, written 0600 (created with that mode,
then renamed into place, so no other user ever sees a readable key); the CA directory
is 0700. Certificates are written 0644. Key bytes never appear in a repr or an error.

This module is orchestrator-side (``emulator``); the node side gets PEM bytes and never
imports it. The clock is read only when the caller passes no ``now``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import re
import tempfile
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "CA_VALIDITY",
    "CLOCK_SKEW",
    "LEAF_VALIDITY",
    "CertError",
    "Credential",
    "CredentialFiles",
    "RunCa",
    "check_node_name",
    "check_sae_id",
    "kme_common_name",
    "sae_uri",
]

CA_CERT_FILE: Final = "ca.pem"
CA_KEY_FILE: Final = "ca.key"
#: Leaves are valid from now - CLOCK_SKEW for LEAF_VALIDITY (a run lasts minutes to hours).
LEAF_VALIDITY: Final = dt.timedelta(days=2)
CLOCK_SKEW: Final = dt.timedelta(minutes=5)
#: The CA outlives its leaves so that `qnetem certs` works on a run directory for a while.
CA_VALIDITY: Final = dt.timedelta(days=30)

_CN_MAX: Final = 64  # RFC 5280 Appendix A.1, ub-common-name
_KME_PREFIX: Final = "kme-"
_NODE_RE: Final = re.compile(r"[a-z0-9][a-z0-9-]*\Z")  # the scenario's name syntax (a DNS label)
_NODE_MAX: Final = _CN_MAX - len(_KME_PREFIX)
_SAE_URN_PREFIX: Final = "urn:qnetem:sae:"
# RFC 3986 §3.3: pchar = unreserved / pct-encoded / sub-delims / ":" / "@"
_URI_SAFE: Final = "-._~!$&'()*+,;=:@"
_LOCALHOST_IP: Final = ipaddress.IPv4Address("127.0.0.1")


class CertError(Exception):
    """A bad name, a missing or damaged CA, or a certificate that does not fit the profile."""


# ---------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------


def check_sae_id(sae_id: object) -> str:
    """Return `sae_id` if it is a valid SAE id (see the module docstring), else raise CertError."""
    if not isinstance(sae_id, str):
        raise CertError(f"an SAE id is text, not {type(sae_id).__name__}")
    shown = sae_id if len(sae_id) <= 70 else sae_id[:67] + "..."
    if not 1 <= len(sae_id) <= _CN_MAX:
        raise CertError(f"SAE id {shown!r}: length {len(sae_id)} is not within 1..{_CN_MAX}")
    if not all(0x20 <= ord(c) <= 0x7E for c in sae_id):
        raise CertError(f"SAE id {shown!r}: only printable ASCII characters are allowed")
    if "/" in sae_id:
        raise CertError(f"SAE id {shown!r}: '/' is not allowed")
    if sae_id != sae_id.strip():
        raise CertError(f"SAE id {shown!r}: leading or trailing spaces are not allowed")
    if sae_id.lower().startswith(_KME_PREFIX):
        raise CertError(f"SAE id {shown!r}: the prefix {_KME_PREFIX!r} is reserved for KMEs")
    return sae_id


def check_node_name(node: object) -> str:
    """Return `node` if it is a valid node (KME) name, else raise CertError."""
    if not isinstance(node, str):
        raise CertError(f"a node name is text, not {type(node).__name__}")
    shown = node if len(node) <= 70 else node[:67] + "..."
    if not 1 <= len(node) <= _NODE_MAX:
        raise CertError(f"node name {shown!r}: length {len(node)} is not within 1..{_NODE_MAX}")
    if _NODE_RE.match(node) is None:
        raise CertError(f"node name {shown!r}: must match [a-z0-9][a-z0-9-]*")
    return node


def kme_common_name(node: str) -> str:
    """The subject CommonName of node `node`'s KME certificate: ``kme-<node>``."""
    return _KME_PREFIX + check_node_name(node)


def sae_uri(sae_id: str) -> str:
    """The URI subjectAltName of an SAE certificate: ``urn:qnetem:sae:<id>`` (percent-encoded)."""
    return _SAE_URN_PREFIX + urllib.parse.quote(check_sae_id(sae_id), safe=_URI_SAFE)


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` atomically, the file having `mode` from its creation on."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclasses.dataclass(frozen=True, slots=True)
class CredentialFiles:
    """Where `Credential.write` put a credential."""

    cert: Path
    key: Path
    ca: Path


@dataclasses.dataclass(frozen=True, slots=True)
class Credential:
    """A certificate, its private key and the run CA's certificate, all PEM."""

    cert_pem: bytes
    key_pem: bytes = dataclasses.field(repr=False)
    ca_pem: bytes

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def common_name(self) -> str:
        return _common_name(self.certificate)

    def write(self, directory: str | os.PathLike[str], stem: str) -> CredentialFiles:
        """Write ``<stem>.pem`` (0644), ``<stem>.key`` (0600) and ``ca.pem`` (0644) into `directory`.

        The directory is created (0700) if missing. `stem` is a file name stem: 1..64
        printable ASCII characters, no '/', not starting with '.', not "ca" (that would
        clash with ca.pem). Returns the three paths.
        """
        if not isinstance(stem, str) or not 1 <= len(stem) <= _CN_MAX or stem.startswith("."):
            raise CertError(f"bad file name stem {stem!r}")
        if "/" in stem or not all(0x20 <= ord(c) <= 0x7E for c in stem) or stem == "ca":
            raise CertError(f"bad file name stem {stem!r}")
        out = Path(directory)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        files = CredentialFiles(cert=out / f"{stem}.pem", key=out / f"{stem}.key", ca=out / CA_CERT_FILE)
        _write_file(files.key, self.key_pem, 0o600)
        _write_file(files.cert, self.cert_pem, 0o644)
        _write_file(files.ca, self.ca_pem, 0o644)
        return files


# ---------------------------------------------------------------------------
# The CA
# ---------------------------------------------------------------------------


def _common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise CertError(f"expected one subject CommonName, found {len(names)}")
    value = names[0].value
    return value if isinstance(value, str) else value.decode()


def _utc(now: dt.datetime | None) -> dt.datetime:
    if now is None:
        return dt.datetime.now(dt.timezone.utc)
    if now.tzinfo is None or now.utcoffset() is None:
        raise CertError("`now` must be an aware datetime (e.g. datetime.now(timezone.utc))")
    return now.astimezone(dt.timezone.utc)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """RFC 5280 §4.2.1.3: every certificate signs (TLS, the hybrid exchange); only the CA
    signs certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=ca, crl_sign=ca,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip


class RunCa:
    """The run's certificate authority: an ECDSA P-256 key and its self-signed certificate."""

    __slots__ = ("_cert", "_key")

    def __init__(self, certificate: x509.Certificate, private_key: ec.EllipticCurvePrivateKey) -> None:
        """Wrap an existing CA; prefer `create` or `load`. Checks the key matches the certificate."""
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, ec.SECP256R1
        ):
            raise CertError("the CA key is not an ECDSA P-256 key")
        if private_key.public_key() != certificate.public_key():
            raise CertError("the CA key does not match the CA certificate")
        try:
            constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            raise CertError("the CA certificate has no basicConstraints") from None
        if not constraints.ca:
            raise CertError("the CA certificate is not a CA (basicConstraints cA=FALSE)")
        self._cert = certificate
        self._key = private_key

    def __repr__(self) -> str:
        return f"<RunCa {self.common_name!r} serial={self._cert.serial_number:x}>"

    # -- creation, persistence ------------------------------------------------

    @classmethod
    def create(cls, run_name: str, *, now: dt.datetime | None = None) -> RunCa:
        """A new CA for run `run_name` (any printable text; the CN is truncated to 64 characters)."""
        if not isinstance(run_name, str) or not run_name or not run_name.isprintable():
            raise CertError("the run name must be non-empty printable text")
        start = _utc(now) - CLOCK_SKEW
        key = ec.generate_private_key(ec.SECP256R1())
        cn = f"qnetem run CA {run_name}"[:_CN_MAX]
        name = x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qnetem"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        )
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``ca.pem`` (0644) and ``ca.key`` (0600) into `directory` (made 0700). Returns it."""
        out = Path(directory)
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(out, 0o700)  # also when it existed with a wider mode
        _write_file(out / CA_KEY_FILE, _private_pem(self._key), 0o600)
        _write_file(out / CA_CERT_FILE, self.certificate_pem, 0o644)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> RunCa:
        """Read a CA saved by `save`; CertError if it is missing or damaged."""
        base = Path(directory)
        try:
            cert_pem = (base / CA_CERT_FILE).read_bytes()
            key_pem = (base / CA_KEY_FILE).read_bytes()
        except FileNotFoundError as exc:
            raise CertError(f"{base}: no run CA ({Path(exc.filename).name} is missing)") from None
        except OSError as exc:
            raise CertError(f"{base}: cannot read the run CA: {exc.strerror or exc}") from None
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise CertError(f"{base / CA_CERT_FILE}: not a PEM certificate") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError):  # the message could quote key material: drop it
            raise CertError(f"{base / CA_KEY_FILE}: not an unencrypted PEM private key") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertError(f"{base / CA_KEY_FILE}: not an ECDSA key")
        return cls(cert, key)

    # -- accessors ------------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def certificate_pem(self) -> bytes:
        return self._cert.public_bytes(serialization.Encoding.PEM)

    @property
    def common_name(self) -> str:
        return _common_name(self._cert)

    def verify(self, cert: x509.Certificate | bytes) -> None:
        """CertError unless `cert` (object or PEM) was signed by this CA (RFC 5280 §6.1.3 (a)(1), (a)(4))."""
        if isinstance(cert, bytes):
            try:
                cert = x509.load_pem_x509_certificate(cert)
            except ValueError:
                raise CertError("not a PEM certificate") from None
        try:
            cert.verify_directly_issued_by(self._cert)
        except (ValueError, TypeError, InvalidSignature):
            raise CertError(f"certificate {_common_name(cert)!r} was not issued by {self.common_name!r}") from None

    # -- issuing --------------------------------------------------------------

    def issue_kme(
        self, node: str, *, now: dt.datetime | None = None, extra_ips: Sequence[str] = ()
    ) -> Credential:
        """The TLS certificate of node `node`'s KME: server + client auth (see the module
        docstring). `extra_ips`: addresses clients reach it at besides 127.0.0.1 (e.g. a
        container's address on its management network), added as IP SANs."""
        cn = kme_common_name(node)
        names: list[x509.GeneralName] = [
            x509.DNSName("localhost"),
            x509.DNSName(node),
            x509.DNSName(f"node-{node}"),
            x509.IPAddress(_LOCALHOST_IP),
        ]
        for text in extra_ips:
            try:
                address = ipaddress.ip_address(text)
            except ValueError:
                raise CertError(f"not an IP address: {text[:64]!r}") from None
            if address != _LOCALHOST_IP:
                names.append(x509.IPAddress(address))
        san = x509.SubjectAlternativeName(names)
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._issue(cn, san, eku, now)

    def issue_sae(self, sae_id: str, *, now: dt.datetime | None = None) -> Credential:
        """The client certificate of SAE `sae_id` (CN = the SAE id; client auth only)."""
        cn = check_sae_id(sae_id)
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sae_uri(sae_id))])
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        return self._issue(cn, san, eku, now)

    def _issue(
        self, cn: str, san: x509.SubjectAlternativeName, eku: x509.ExtendedKeyUsage, now: dt.datetime | None
    ) -> Credential:
        start = _utc(now) - CLOCK_SKEW
        ca_end = self._cert.not_valid_after_utc
        if start + CLOCK_SKEW >= ca_end:
            raise CertError(f"the run CA {self.common_name!r} expired at {ca_end.isoformat()}")
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = self._cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(min(start + LEAF_VALIDITY, ca_end))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(eku, critical=False)
            .add_extension(san, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        return Credential(
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_private_pem(key),
            ca_pem=self.certificate_pem,
        )
