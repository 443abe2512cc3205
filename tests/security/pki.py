"""Certificates, keys and CRLs made for the TLS tests with ``cryptography``
(trustme cannot make a URI SAN, a subject with two CNs or a CRL).

``CA("ecdsa")`` is a root; ``ca.issue(...)`` a leaf (server or client) with
the names, key type and validity asked for; ``ca.crl([leaf, ...])`` a PEM
CRL revoking them; ``write(dir, name)`` puts a leaf's cert and key in files.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_NOW = dt.datetime.now(dt.UTC)


def _key(kind: str):
    if kind == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass
class Leaf:
    cert: x509.Certificate
    key: object

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return _pem_key(self.key)

    def write(self, directory: Path, name: str) -> tuple[str, str]:
        """(cert path, key path) of this leaf's PEM files in ``directory``."""
        cert, key = directory / f"{name}.crt", directory / f"{name}.key"
        cert.write_bytes(self.cert_pem)
        key.write_bytes(self.key_pem)
        return str(cert), str(key)


class CA:
    def __init__(self, kind: str = "ecdsa", name: str = "gridgate test CA") -> None:
        self.key = _key(kind)
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - dt.timedelta(days=1)).not_valid_after(_NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: Path, name: str = "ca") -> str:
        path = directory / f"{name}.crt"
        path.write_bytes(self.cert_pem)
        return str(path)

    def issue(self, *, cn: str | list[str] | None = None, dns: tuple[str, ...] = (), uris: tuple[str, ...] = (),
              ips: tuple[str, ...] = (), kind: str = "ecdsa", server: bool = False,
              not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Leaf:
        import ipaddress

        key = _key(kind)
        cns = [cn] if isinstance(cn, str) else (cn or [])
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "gridgate tests")]
                            + [x509.NameAttribute(NameOID.COMMON_NAME, c) for c in cns])
        builder = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or _NOW - dt.timedelta(days=1))
            .not_valid_after(not_after or _NOW + dt.timedelta(days=10))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                  else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        names += [x509.UniformResourceIdentifier(u) for u in uris]
        names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return Leaf(builder.sign(self.key, hashes.SHA256()), key)

    def server(self, kind: str = "ecdsa") -> Leaf:
        """A server certificate for the loopback names the tests connect to."""
        return self.issue(cn="localhost", dns=("localhost",), ips=("127.0.0.1",), kind=kind, server=True)

    def crl(self, revoked: list[Leaf]) -> bytes:
        builder = (x509.CertificateRevocationListBuilder().issuer_name(self.name)
                   .last_update(_NOW - dt.timedelta(hours=1)).next_update(_NOW + dt.timedelta(days=7)))
        for leaf in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(leaf.cert.serial_number)
                .revocation_date(_NOW - dt.timedelta(minutes=5)).build())
        return builder.sign(self.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
