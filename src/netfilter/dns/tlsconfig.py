"""TLS for the encrypted DNS listeners: a server context from the configured PEM files,
and a self-signed pair for the demo.

The stdlib `ssl` does the TLS (OpenSSL); nothing here frames or parses records. The
context is TLS 1.2 or newer (RFC 8310 section 9 and RFC 9325: no older versions for
DNS privacy), with ALPN so that one certificate serves DoT ("dot") and DoH ("h2",
"http/1.1"). A file that is missing, unreadable, not PEM, or a key that does not match
its certificate is one ConfigError naming the key (`dns.tls_certificate`) and the file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from collections.abc import Sequence
from pathlib import Path

from netfilter.errors import ConfigError

__all__ = ["ALPN_DOH", "ALPN_DOT", "generate_self_signed", "server_context"]

ALPN_DOT = ("dot",)  # RFC 9461's registration; RFC 7858 clients send none, which is fine
ALPN_DOH = ("h2", "http/1.1")  # HTTP/2 preferred (RFC 8484 section 5.2)


def server_context(certificate: Path, key: Path, alpn: Sequence[str]) -> ssl.SSLContext:
    """A server-side context presenting `certificate` (with its chain) and `key`."""
    for name, path in (("dns.tls_certificate", certificate), ("dns.tls_key", key)):
        if not path.is_file():
            raise ConfigError(name, f"{path}: no such file")
        if not os.access(path, os.R_OK):
            raise ConfigError(name, f"{path}: not readable (permission denied)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    try:
        context.load_cert_chain(certificate, key)
    except ssl.SSLError as e:
        raise ConfigError("dns.tls_key", f"{certificate} and {key}: cannot be used together "
                                         f"as a PEM certificate and its key ({_why(e)})"
                          ) from None
    except OSError as e:
        raise ConfigError("dns.tls_certificate",
                          f"{certificate}: {e.strerror or e}") from None
    context.set_alpn_protocols(list(alpn))
    return context


def _why(error: ssl.SSLError) -> str:
    reason = getattr(error, "reason", None)
    return str(reason).replace("_", " ").lower() if reason else str(error)


def generate_self_signed(certificate: Path, key: Path, *, name: str = "localhost",
                         addresses: Sequence[str] = ("127.0.0.1", "::1"),
                         days: int = 365) -> None:
    """Write a new self-signed ECDSA P-256 pair (the key file 0600) for `name` and
    `addresses`: what the demo serves DoT and DoH with. Clients must be told not to
    verify it (kdig: no +tls-ca; dnspython: verify=False)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(name)]
    alt += [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(private.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(private, hashes.SHA256()))
    pem_key = private.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o600)
        out.write(pem_key)
    certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
