"""
TLS helpers shared by the gateway's provider client, its Redis client
and C{openclawctl}: trusting a CA file (read bounded: L{read_ca_file}),
checking the server's host name whatever service_identity raises
(L{HostnameChecked}), and saying why a TLS handshake failed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, TypeGuard

from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_pem_x509_certificates
from OpenSSL import SSL
from OpenSSL.SSL import Error as OpenSSLError
from service_identity import CertificateError, VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, trustRootFromCertificates
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from openclaw.files import read_regular_file


def trust_root_from_pem(data: bytes) -> Any:
    """
    Every CA certificate in the PEM text C{data} (one CA or a bundle), as a
    trust root (what C{trustRootFromCertificates} returns: Twisted's
    C{IOpenSSLTrustRoot}, which only its private C{_sslverify} module
    names, hence C{Any} here) for C{optionsForClientTLS} or
    C{BrowserLikePolicyForHTTPS}.

    @raise ValueError: it holds no PEM certificate.
    """
    certificates = load_pem_x509_certificates(data)
    return trustRootFromCertificates([Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in certificates])


#: The most bytes of a CA file read (C{UPSTREAM_CA_FILE}, C{openclawctl
#: --cafile}): a whole system bundle is some 220 KB.
MAX_CA_FILE_BYTES = 1024 * 1024


def read_ca_file(path: Path) -> bytes:
    """
    The bytes of the CA file C{path}, read as an untrusted file
    (L{read_regular_file}, links followed, as C{/etc/ssl/certs} holds
    links): only a regular file of at most L{MAX_CA_FILE_BYTES}, without
    waiting on it (a FIFO would hang, a device never end).

    @raise NotARegularFile: it is not a regular file, or too large; the
        message says which.
    @raise OSError: it cannot be read.
    """
    return read_regular_file(path, MAX_CA_FILE_BYTES, follow_links=True)


def trust_root_from_file(path: Path) -> Any:
    """
    Every CA certificate in the PEM file C{path} (L{read_ca_file}), as
    L{trust_root_from_pem}.

    @raise OSError: the file cannot be read, or is no regular file of at
        most L{MAX_CA_FILE_BYTES} (L{NotARegularFile}).
    @raise ValueError: it holds no PEM certificate.
    """
    return trust_root_from_pem(read_ca_file(path))


def is_tls_error(error: BaseException | None) -> TypeGuard[BaseException]:
    """
    Whether C{error} is a failed TLS handshake: pyOpenSSL's error (bad
    chain, protocol) or service_identity's (wrong host name; names it
    cannot read, C{CertificateError}).
    """
    return isinstance(error, (OpenSSLError, VerificationError, CertificateError))


def describe_tls_error(error: BaseException) -> str:
    """
    The reason of a TLS failure in words ("certificate verify failed"):
    a pyOpenSSL error carries a list of C{(library, function, reason)}
    tuples, whose reasons are given in that order, joined with C{"; "};
    any other error (service_identity's), its text, or its type's name
    when it has none.
    """
    details = error.args[0] if error.args else None
    if isinstance(details, list) and details and isinstance(details[-1], tuple):
        return "; ".join(str(entry[-1]) for entry in details if isinstance(entry, tuple))
    return str(error) or type(error).__name__


@implementer(IOpenSSLClientConnectionCreator)
class HostnameChecked:
    """
    C{creator}'s TLS connections, with the server's certificate checked
    against C{host} (a DNS name, or an IP address) once more when the
    handshake is done, before any request (and its API key) is written:
    Twisted's own check (C{optionsForClientTLS}'s verify callback) logs any
    error of service_identity's but C{VerificationError} and lets the
    handshake through, so a certificate whose names service_identity cannot
    read (C{CertificateError}: a wildcard over one label, C{*.example})
    from a trusted CA was never checked at all.  Here any error fails the
    connection (L{TLSMemoryBIOProtocol.failVerification}).
    """

    def __init__(self, creator: IOpenSSLClientConnectionCreator, host: str) -> None:
        self._creator = creator
        self._host = host
        self._verify = verify_ip_address if isIPAddress(host) or isIPv6Address(host) else verify_hostname

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        connection.set_info_callback(partial(self._handshake_step, tlsProtocol))
        return connection

    def _handshake_step(
        self, tlsProtocol: TLSMemoryBIOProtocol, connection: SSL.Connection, where: int, ret: int
    ) -> None:
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        try:
            self._verify(connection, self._host)
        except Exception:
            # Raised in OpenSSL's callback it would be lost: the connection
            # is failed instead, its reason this failure.
            tlsProtocol.failVerification(Failure())
