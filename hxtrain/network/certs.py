"""A per-run certificate authority and one certificate per site, for `hxtrain launch` (and tests).

X.509 is written by the `cryptography` library, never by hand. Keys are ECDSA P-256. The CA's private key lives
only in memory while the certificates are minted and is never written, so nobody can mint another certificate of
the run afterwards; the site keys are written with mode 0600.

    files = mint_run_certs("/run/certs", ["a", "b"])   # {"a": TlsConfig(cert=.../a.pem, key=.../a.key, ca=...)}
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from hxtrain.network.tls import TlsConfig

_DAY = dt.timedelta(days=1)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(obj) -> bytes:
    from cryptography.hazmat.primitives import serialization

    if hasattr(obj, "public_bytes"):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certificate(subject, issuer, public_key, signing_key, *, ca: bool, not_before, not_after, site=None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID

    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
         .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
    else:  # a site is the server of one link and the client of the next
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(site)]), critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                            critical=False)
    return b.sign(signing_key, hashes.SHA256())


def mint_run_certs(folder, sites, *, days: float = 30, not_before=None, not_after=None) -> dict[str, TlsConfig]:
    """Mint a CA and one certificate per site name into `folder` (created, mode 0700): ca.pem, <site>.pem and
    <site>.key. Returns {site: TlsConfig}. Valid from an hour ago for `days`, unless `not_before` / `not_after`
    (datetimes, UTC) say otherwise (tests mint expired ones)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = dt.datetime.now(dt.timezone.utc)
    start = not_before or now - dt.timedelta(hours=1)
    end = not_after or now + days * _DAY
    ca_key = _key()
    ca_name = _name(f"hxtrain run CA {os.urandom(4).hex()}")
    ca_cert = _certificate(ca_name, ca_name, ca_key.public_key(), ca_key, ca=True, not_before=start, not_after=end)
    ca_path = folder / "ca.pem"
    ca_path.write_bytes(_pem(ca_cert))
    out = {}
    for site in sites:
        key = _key()
        cert = _certificate(_name(site), ca_name, key.public_key(), ca_key, ca=False, not_before=start,
                            not_after=end, site=site)
        key_path, cert_path = folder / f"{site}.key", folder / f"{site}.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(_pem(key))
        cert_path.write_bytes(_pem(cert))
        out[site] = TlsConfig(cert=str(cert_path), key=str(key_path), ca=str(ca_path))
    return out


def certificate_names(path) -> tuple[str, ...]:
    """The site names a PEM certificate carries: its DNS subject alternative names, then its common name (what
    `hxtrain.network.tls.TlsChannel.peer_names` reads from a peer)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        names = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                     .get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = []
    names += [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(names))
