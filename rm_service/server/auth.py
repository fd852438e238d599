"""Bearer tokens with roles, the bind rule, and TLS credentials for the gRPC server.

Clients send metadata `authorization: Bearer <token>`. A token has one role: `scorer` may call
RewardService, `labeler` PreferenceService, `admin` everything (TrainingService only admin).
Health and reflection stay open so probes and `grpcurl list` need no token. A missing or
unknown token is UNAUTHENTICATED; a known token without the method's role PERMISSION_DENIED.

Tokens come from SecuritySettings (a `role:token` file and/or RM_AUTH_TOKENS), are compared
with hmac.compare_digest against every configured token, and are never logged. With no tokens
configured authentication is off, and the server binds loopback addresses only.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import hmac
import ipaddress
import logging
import socket
import ssl
from pathlib import Path

import grpc

from rm_service.errors import FailedPrecondition, PermissionDenied, RMError, Unauthenticated, status_code
from rm_service.server.handlers import with_behaviour
from rm_service.settings import SecuritySettings

log = logging.getLogger(__name__)

ROLES = ("scorer", "labeler", "admin")
ADMIN = "admin"
# The one method -> role table: every method of a service needs its service's role (admin passes
# everywhere). Services listed in OPEN need no token; any service not listed needs admin.
SERVICE_ROLES = {
    "rm.v1.RewardService": "scorer",
    "rm.v1.PreferenceService": "labeler",
    "rm.v1.TrainingService": ADMIN,
}
OPEN = frozenset(
    {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection", "grpc.reflection.v1.ServerReflection"}
)
MIN_TOKEN_CHARS = 16


def required_role(method: str) -> str | None:
    """The role `/package.Service/Method` needs; None when the method is open (probes)."""
    service = method.lstrip("/").split("/", 1)[0]
    return None if service in OPEN else SERVICE_ROLES.get(service, ADMIN)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Tokens:
    """The configured (role, token) pairs. Its repr and every error message leave the tokens out."""

    def __init__(self, entries: list[tuple[str, bytes]]):
        self._entries = entries

    @classmethod
    def from_settings(cls, security: SecuritySettings) -> Tokens:
        entries: list[tuple[str, bytes]] = []
        if security.tokens_file is not None:
            data = _read(security.tokens_file, "RM_AUTH_TOKENS_FILE")
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise FailedPrecondition(
                    f"RM_AUTH_TOKENS_FILE: {security.tokens_file} is not UTF-8 text (byte {exc.start + 1})"
                ) from None
            entries += _parse(text.splitlines(), f"RM_AUTH_TOKENS_FILE {security.tokens_file} line")
            _warn_if_readable_by_others(security.tokens_file)
        if security.tokens is not None:
            entries += _parse(security.tokens.get_secret_value().split(","), "RM_AUTH_TOKENS entry")
        roles: dict[bytes, str] = {}
        for role, token in entries:
            if roles.setdefault(token, role) != role:
                raise FailedPrecondition("the same bearer token is configured with two roles; give each token one role")
        return cls(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Tokens({len(self)} configured)"

    def role_of(self, presented: str) -> str | None:
        """The role of a presented token, or None. Compares against every token (no early exit)."""
        candidate = presented.encode("utf-8")
        found = None
        for role, token in self._entries:
            if hmac.compare_digest(token, candidate) and found is None:
                found = role
        return found


def _parse(lines: list[str], where: str) -> list[tuple[str, bytes]]:
    entries = []
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        role, sep, token = (part.strip() for part in line.partition(":"))
        if not sep or role not in ROLES:  # the message never echoes the line: it may be a bare token
            raise FailedPrecondition(f"{where} {n}: expected role:token with role one of {', '.join(ROLES)}")
        if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
            raise FailedPrecondition(
                f"{where} {n}: a {role} token must be at least {MIN_TOKEN_CHARS} printable ASCII characters without "
                "spaces"
            )
        entries.append((role, token.encode("ascii")))
    return entries


def _read(path: Path, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise FailedPrecondition(f"{setting}: cannot read {path}: {exc.strerror}") from None


def _warn_if_readable_by_others(path: Path) -> None:
    if Path(path).stat().st_mode & 0o077:
        log.warning("tokens file %s is accessible to other users; chmod 600 it", path)


def bearer_token(metadata) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; '' when malformed, None when absent."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def http_token(headers) -> str | None:
    """The token an HTTP caller presents: a bearer token, or the password of HTTP Basic credentials
    (`Authorization: Basic base64(user:token)`, what a client sends for `https://user:TOKEN@host/`
    when it cannot set headers, as OpenRLHF's --remote_rm_url). The user name is ignored: the
    token alone says who calls. '' when malformed, None when absent."""
    for key, value in headers or ():
        if key.lower() == "authorization":
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() != "basic":
                return bearer_token([(key, value)])
            try:
                decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                return ""
            return decoded.partition(":")[2]
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token and role of every call to a non-open method."""

    def __init__(self, tokens: Tokens):
        self.tokens = tokens

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        needed = required_role(details.method)
        if handler is None or needed is None:
            return handler
        try:
            authorize(self.tokens, bearer_token(details.invocation_metadata), needed, details.method)
        except RMError as error:
            return with_behaviour(handler, _refuse(details.method, error))
        return handler


def authorize(tokens: Tokens, token: str | None, needed: str, what: str) -> str:
    """The role of `token` when it may do `what`, which needs the `needed` role (admin may do
    everything); else Unauthenticated (no or unknown token) or PermissionDenied (wrong role).
    One check for gRPC (AuthInterceptor) and HTTP (server.http)."""
    role = tokens.role_of(token) if token else None
    if role is not None and role in (needed, ADMIN):
        return role
    if token is None:
        raise Unauthenticated(
            "missing bearer token: send `authorization: Bearer <token>` (over HTTP, HTTP Basic with the token as "
            "password also works)"
        )
    if role is None:
        raise Unauthenticated("invalid bearer token")
    raise PermissionDenied(f"role {role} may not call {what}; it needs the {needed} or admin role")


def identity(role: str, token: str) -> str:
    """A stable pseudonymous id for the holder of a token, e.g. `labeler-3f9a0c12d4e5`: the
    annotator of the labels a person sends through the labeling page. Tokens carry no name,
    and the id must come from the credential, never from what the client says; 48 bits of
    SHA-256 tell tokens apart without revealing them."""
    return f"{role}-{hashlib.sha256(token.encode('utf-8')).hexdigest()[:12]}"


def _refuse(method: str, error: RMError):
    code = status_code(error)

    async def refuse(request, context: grpc.aio.ServicerContext):
        peer = context.peer()
        log.warning(
            "%s: %s from %s", code.name, method, peer, extra={"method": method, "peer": peer, "code": code.name}
        )
        await context.abort(code, str(error))

    return refuse


def check_bind(host: str, tokens: Tokens, tls: bool) -> None:
    """Refuse a non-loopback bind without tokens; warn about one without TLS."""
    if is_loopback(host):
        return
    if not tokens:
        raise FailedPrecondition(
            f"refusing to bind {host}: no bearer tokens are configured, and a server on a non-loopback address must "
            "authenticate its callers. Set RM_AUTH_TOKENS_FILE (serve --tokens-file PATH, lines role:token) or "
            "RM_AUTH_TOKENS, or bind 127.0.0.1"
        )
    if not tls:
        log.warning(
            "binding %s without TLS: bearer tokens and data travel in clear text; set RM_AUTH_TLS_CERT and "
            "RM_AUTH_TLS_KEY (serve --tls-cert, --tls-key)",
            host,
        )


def check_address_free(host: str, port: int) -> None:
    """Refuse, in one line, an address gRPC could not bind or would share: gRPC says only
    "Failed to bind", and with SO_REUSEPORT it lets a second server share a port in use by
    another gRPC server (each then gets half the calls). Port 0 checks only the host."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise FailedPrecondition(f"cannot bind {host}: {exc.strerror}") from None
    errors = []
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a port in TIME_WAIT is free
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise FailedPrecondition(
                        f"cannot bind {host}:{port}: the port is in use (another rm-service serve?); "
                        "pass --port (RM_SERVE_PORT) a free port, or 0 for any"
                    ) from None
                errors.append(exc)
    if errors and len(errors) == len(addresses):  # gRPC binds if any resolved address binds
        raise FailedPrecondition(f"cannot bind {host}:{port}: {errors[0].strerror}")


def server_credentials(security: SecuritySettings) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual TLS when a client CA is set), or None for plaintext."""
    if security.tls_cert is None and security.tls_key is None:
        if security.tls_client_ca is not None:
            raise FailedPrecondition(
                "RM_AUTH_TLS_CLIENT_CA (--tls-client-ca) needs RM_AUTH_TLS_CERT and RM_AUTH_TLS_KEY as well"
            )
        return None
    if security.tls_cert is None or security.tls_key is None:
        raise FailedPrecondition("TLS needs both RM_AUTH_TLS_CERT (--tls-cert) and RM_AUTH_TLS_KEY (--tls-key)")
    cert = _pem(security.tls_cert, "RM_AUTH_TLS_CERT")
    key = _pem(security.tls_key, "RM_AUTH_TLS_KEY")
    ca = _pem(security.tls_client_ca, "RM_AUTH_TLS_CLIENT_CA") if security.tls_client_ca is not None else None
    _check_tls_files(security)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)


def _check_tls_files(security: SecuritySettings) -> None:
    """Load the files with OpenSSL (Python's ssl) first: gRPC takes any PEM bytes here and
    fails later, at bind, with only "Failed to bind to address"."""
    assert security.tls_cert is not None  # server_credentials checked that both are set
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # An encrypted key fails, never prompts.
        context.load_cert_chain(security.tls_cert, security.tls_key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise FailedPrecondition(
                f"RM_AUTH_TLS_KEY: {security.tls_key} is not the private key of the certificate in "
                f"RM_AUTH_TLS_CERT {security.tls_cert}"
            ) from None
        raise FailedPrecondition(
            f"RM_AUTH_TLS_CERT/RM_AUTH_TLS_KEY: OpenSSL cannot load {security.tls_cert} with {security.tls_key} "
            f"({exc.reason or exc}); they must be a PEM certificate chain and its unencrypted PEM private key"
        ) from None
    if security.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=security.tls_client_ca)
        except ssl.SSLError as exc:
            raise FailedPrecondition(
                f"RM_AUTH_TLS_CLIENT_CA: OpenSSL cannot load {security.tls_client_ca} as PEM CA certificates "
                f"({exc.reason or exc})"
            ) from None


def _pem(path: Path, setting: str) -> bytes:
    data = _read(path, setting)
    if b"-----BEGIN " not in data:
        raise FailedPrecondition(f"{setting}: {path} is not a PEM file")
    return data
