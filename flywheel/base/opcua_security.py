"""OPC UA security shared by the simulator's server and the gateway: application instance
certificates, the security policies the stack accepts, and what a refused connection means.

An OPC UA client and server each present an *application instance certificate* (X.509, the
application URI in its subjectAltName) when they open a secure channel; the channel signs (mode
``Sign``) or signs and encrypts (``SignAndEncrypt``) every message under a *security policy*. On
top of the channel, a session may carry a user name and password (encrypted with the server's
certificate). ``asyncua`` does the cryptography; this module only names things and makes
self-signed certificates for a plant or a gateway that has none yet.
"""

from __future__ import annotations

import socket
from pathlib import Path

#: The security policies the stack accepts (asyncua's names; the OPC UA profiles of the same
#: name). The deprecated Basic128Rsa15 and Basic256 are not offered.
POLICIES = ("Basic256Sha256", "Aes128Sha256RsaOaep", "Aes256Sha256RsaPss")
MODES = ("Sign", "SignAndEncrypt")
#: The application URI of certificates the stack makes for its gateway and its simulated plant.
GATEWAY_URI = "urn:flywheel:gateway"
PLANT_URI = "urn:flywheel:plant"


def make_certificate(cert: str | Path, key: str | Path, application_uri: str, *, server: bool = False) -> tuple[Path, Path]:
    """A self-signed application instance certificate (DER) and its 2048-bit RSA key (PEM) at
    ``cert`` / ``key``, valid for a year, for ``application_uri`` on this host; an existing valid
    pair is kept. ``server``: usable as a server's as well as a client's certificate."""
    import asyncio

    from asyncua.crypto import cert_gen
    from cryptography.x509.oid import ExtendedKeyUsageOID

    cert, key = Path(cert), Path(key)
    cert.parent.mkdir(parents=True, exist_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    use = [ExtendedKeyUsageOID.CLIENT_AUTH] + ([ExtendedKeyUsageOID.SERVER_AUTH] if server else [])
    asyncio.run(cert_gen.setup_self_signed_certificate(key, cert, application_uri, socket.gethostname(), use,
                                                       {"organizationName": "flywheel"}))
    return cert, key


def application_uri_of(cert: str | Path) -> str | None:
    """The application URI in a certificate's subjectAltName (DER or PEM), or None."""
    from cryptography import x509

    data = Path(cert).read_bytes()
    c = x509.load_pem_x509_certificate(data) if data.lstrip().startswith(b"-----BEGIN") else \
        x509.load_der_x509_certificate(data)
    try:
        san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def policy_class(name: str):
    """asyncua's client-side class of a policy in :data:`POLICIES`."""
    from asyncua.crypto import security_policies

    return getattr(security_policies, f"SecurityPolicy{name}")


def server_policy(name: str, mode: str):
    """asyncua's server-side ``SecurityPolicyType`` of a policy and mode."""
    from asyncua import ua

    return getattr(ua.SecurityPolicyType, f"{name}_{mode}")


#: Status codes with which a server refuses the client's channel or identity, and the fix.
REFUSALS = {
    "BadSecurityPolicyRejected": "the server offers no endpoint with this security policy and mode: set "
                                 "opcua.security (policy, mode) in the mapping to one the server offers",
    "BadSecurityModeRejected": "the server refuses this security mode: set opcua.security.mode to one it offers",
    "BadCertificateUntrusted": "the server does not trust the gateway's certificate: add "
                               "opcua.security.certificate to the server's trusted certificates",
    "BadCertificateInvalid": "the server finds the gateway's certificate invalid: make a new one "
                             "(flywheel gateway --make-certificate DIR)",
    "BadSecurityChecksFailed": "the secure channel failed its checks: the server may not trust the gateway's "
                               "certificate, or opcua.security.server_certificate is not the server's",
    "BadIdentityTokenRejected": "the server refuses this kind of identity: set opcua.user and opcua.password "
                                "(or leave them out for an anonymous session) as the server asks",
    "BadIdentityTokenInvalid": "the server refuses the identity: check opcua.user and opcua.password",
    "BadUserAccessDenied": "the server refused the user name or password: check opcua.user and opcua.password",
}


def refusal(exc: BaseException) -> str | None:
    """The fix for a connection a server refused for security (None: not a security refusal)."""
    text = f"{type(exc).__name__} {exc}"
    if "No matching endpoints" in text:     # asyncua's client, before it asks for a channel
        policy = text.rsplit("#", 1)[-1].strip("')\" ")
        return (f"no endpoint with security policy {policy} and this mode: the server asks for another; set "
                "opcua.security (policy, mode, the gateway's certificate and key) to one it offers")
    for code, fix in REFUSALS.items():
        if code in text:
            return f"{code}: {fix}"
    return None
