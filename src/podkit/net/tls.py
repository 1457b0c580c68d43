"""TLS for podkit's servers: modern server contexts, certificates reloaded when their
files change, and self-signed certificates for development.

- `server_context(cert, key)`: TLS 1.2 and 1.3 only; for TLS 1.2 only ECDHE key exchange
  with AES-GCM or ChaCha20-Poly1305 (forward secrecy, AEAD); no compression, no
  renegotiation; ALPN `http/1.1`.
- `ReloadingContext(cert, key)`: the context to hand to `create_server`. Every handshake
  is switched (through the SNI callback) to the context made from the newest readable
  files, so a renewed certificate serves new connections at once without a restart;
  `check()` (or `run()`, every `interval` seconds) notices a change of either file. A pair
  that fails to load (half-written, mismatched) is reported and the last good one stays.
- `self_signed(dir, hosts)`: an ECDSA P-256 certificate for the given names and IP
  addresses, valid for a year, written as `cert.pem` and `key.pem` (mode 600).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20"


class _DirectSSLObject(ssl.SSLObject):
    """An `ssl.SSLObject` whose `read`, `write` and `pending` are the C methods themselves.

    The event loop calls them for every TLS record it moves; the Python wrappers in `ssl`
    only forward their arguments, at the price of a frame per call. Where the wrapped
    object is not there (another Python), the wrappers stay."""

    @classmethod
    def _create(cls, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        obj = super()._create(*args, **kwargs)  # type: ignore[misc]
        inner = getattr(obj, "_sslobj", None)
        if inner is not None:
            obj.read = inner.read
            obj.write = inner.write
            obj.pending = inner.pending
        return obj  # type: ignore[no-any-return]


def server_context(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> ssl.SSLContext:
    """A server context for one certificate chain and key (raises ssl.SSLError, OSError)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.sslobject_class = _DirectSSLObject
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.load_cert_chain(os.fspath(cert), os.fspath(key))
    return ctx


def pair_problem(cert: str | os.PathLike[str], key: str | os.PathLike[str]) -> str | None:
    """Why a server context cannot be made from `cert` and `key`, said plainly; None if
    it can."""
    try:
        server_context(cert, key)
        return None
    except OSError as exc:  # ssl.SSLError is one too
        error = exc
    texts = []
    for path in (cert, key):  # OpenSSL's errors do not always say which file
        try:
            texts.append(Path(path).read_bytes())
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}"
    if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
        return f"the key in {key} is not the certificate's ({cert})"
    if b"-----BEGIN CERTIFICATE-----" not in texts[0]:
        return f"{cert} holds no PEM certificate (no '-----BEGIN CERTIFICATE-----')"
    if b"PRIVATE KEY-----" not in texts[1]:
        return f"{key} holds no PEM private key (no 'PRIVATE KEY-----')"
    return f"{cert}, {key}: {getattr(error, 'reason', None) or error}"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class ReloadingContext:
    """A server context whose certificate follows its files (see the module doc)."""

    def __init__(
        self,
        cert: str | os.PathLike[str],
        key: str | os.PathLike[str],
        *,
        interval: float = 1.0,
        log: Callable[[str], None] = lambda _: None,
    ) -> None:
        self.cert, self.key = Path(cert), Path(key)
        self.interval = interval
        self.log = log
        self.current = server_context(self.cert, self.key)  # the first load must work
        self.loads = 1
        self.last_error: str | None = None
        self._stamps = (_stamp(self.cert), _stamp(self.key))
        self.context = server_context(self.cert, self.key)  # the one servers are given
        self.context.sni_callback = self._switch

    def _switch(self, sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        sock.context = self.current
        return None

    def check(self) -> bool:
        """Reload if either file changed; True when a new certificate is in use."""
        stamps = (_stamp(self.cert), _stamp(self.key))
        if stamps == self._stamps:
            return False
        self._stamps = stamps
        try:
            fresh = server_context(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            self.last_error = pair_problem(self.cert, self.key) or f"{self.cert}: {exc}"
            self.log(f"certificate not reloaded, keeping the last good one: {self.last_error}")
            return False
        self.current = fresh
        self.loads += 1
        self.last_error = None
        self.log(f"certificate reloaded from {self.cert}")
        return True

    async def run(self) -> None:
        """Check every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            with contextlib.suppress(Exception):
                self.check()


def self_signed(
    directory: str | os.PathLike[str], hosts: Sequence[str] = ("localhost", "127.0.0.1")
) -> tuple[Path, Path]:
    """Write a self-signed certificate for `hosts`; return (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "podkit")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / "cert.pem", out / "key.pem"
    key_bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path
