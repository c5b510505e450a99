"""
TLS helpers shared by the gateway's provider client, its Redis client
and C{openclawctl}: trusting a CA file (read bounded: L{read_ca_file}),
checking the server's host name whatever service_identity raises
(L{HostnameChecked}), and saying why a TLS handshake failed.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeGuard

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import load_pem_x509_certificates
from OpenSSL import SSL
from OpenSSL.crypto import X509
from OpenSSL.SSL import Error as OpenSSLError
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname, verify_certificate_ip_address
from service_identity.exceptions import Mismatch
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


#: The most names of a certificate told in one description.
NAMES_SHOWN = 5


def certificate_names(certificate: x509.Certificate) -> list[str]:
    """
    The host names and IP addresses a certificate is valid for: its
    subjectAltName's DNS and IP entries, in its order (its CN is not one:
    service_identity, which checks the name, goes by subjectAltName
    only, RFC 6125 section 6.4.4).
    """
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [str(name.value) for name in names if isinstance(name, (x509.DNSName, x509.IPAddress))]


class CertificateNotForHost(VerificationError):
    """
    service_identity's C{VerificationError} (the server's certificate does
    not name the host connected to), with that host and the names the
    certificate does hold (L{certificate_names}), as L{HostnameChecked}
    saw them: L{describe_tls_error} says both.
    """

    def __init__(self, errors: Sequence[Mismatch], host: str, names: Sequence[str]) -> None:
        super().__init__(errors)
        #: The host name or IP address connected to.
        self.host = host
        #: The certificate's names (DNS names, IP addresses), in its order.
        self.names = tuple(names)

    def __str__(self) -> str:
        return describe_tls_error(self)


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
    a certificate that does not name the host (service_identity's
    C{VerificationError}): "the certificate is not valid for 127.0.0.1
    (it names api.example.test)" (the names when L{HostnameChecked} saw
    them: L{CertificateNotForHost}; at most L{NAMES_SHOWN}), never the
    error's Python repr; names that cannot be checked
    (C{CertificateError}): "the certificate's names cannot be checked:
    " and its text; any other error, its text, or its type's name when
    it has none.
    """
    if isinstance(error, VerificationError):
        if not isinstance(error, CertificateNotForHost):
            return "the certificate is not valid for the host connected to"
        said = f"the certificate is not valid for {error.host}"
        if not error.names:
            return f"{said} (it names no host: it has no subjectAltName, and a certificate's CN is not used)"
        # Printable only (a name is the server's text), 100 characters at most.
        shown = ", ".join(
            "".join(c if c.isprintable() else "?" for c in name[:100]) for name in error.names[:NAMES_SHOWN]
        )
        if len(error.names) > NAMES_SHOWN:
            shown += f" and {len(error.names) - NAMES_SHOWN} more"
        return f"{said} (it names {shown})"
    if isinstance(error, CertificateError):
        return f"the certificate's names cannot be checked: {str(error) or type(error).__name__}"
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

    def __init__(self, creator: IOpenSSLClientConnectionCreator, host: str, *, tell_names: bool = False) -> None:
        self._creator = creator
        self._host = host
        #: Replace the creator's verify callback by L{_certificate_step}
        #: (for Twisted's C{optionsForClientTLS}, which checks the host
        #: there): a creator with a verify callback of its own (openclawctl
        #: keeps the chain it is shown) keeps it.
        self._tell_names = tell_names
        self._verify = verify_ip_address if isIPAddress(host) or isIPv6Address(host) else verify_hostname

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = self._creator.clientConnectionForTLS(tlsProtocol)
        connection.set_info_callback(partial(self._handshake_step, tlsProtocol))
        # Twisted's verify callback (C{optionsForClientTLS}) checks the
        # host name too, but fails with service_identity's bare
        # VerificationError: replaced by one that says the names the
        # certificate holds (L{CertificateNotForHost}).
        if self._tell_names:
            connection.set_verify(
                SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, partial(self._certificate_step, tlsProtocol)
            )
        return connection

    def _certificate_step(
        self,
        tlsProtocol: TLSMemoryBIOProtocol,
        connection: SSL.Connection,
        certificate: X509,
        error: int,
        depth: int,
        ok: int,
    ) -> bool:
        """
        OpenSSL's verdict on each certificate of the chain (C{ok}), kept;
        the server's own (C{depth} 0) is also checked against the host: a
        mismatch fails the connection with L{CertificateNotForHost}.
        Names service_identity cannot read are left to L{_handshake_step}.
        """
        if depth != 0 or not ok:
            return bool(ok)
        try:
            own = certificate.to_cryptography()
            if self._verify is verify_ip_address:
                verify_certificate_ip_address(own, self._host)
            else:
                verify_certificate_hostname(own, self._host)
        except VerificationError as mismatch:
            tlsProtocol.failVerification(
                Failure(CertificateNotForHost(mismatch.errors, self._host, certificate_names(own)))
            )
            return False
        except Exception:
            # Raised in OpenSSL's callback it would be lost:
            # _handshake_step checks again, and fails the connection.
            return True
        return True

    def _handshake_step(
        self, tlsProtocol: TLSMemoryBIOProtocol, connection: SSL.Connection, where: int, ret: int
    ) -> None:
        if not where & SSL.SSL_CB_HANDSHAKE_DONE:
            return
        try:
            self._verify(connection, self._host)
        except VerificationError as error:
            # Raised in OpenSSL's callback it would be lost: the connection
            # is failed instead, its reason this failure, with the names
            # the certificate holds (for describe_tls_error).
            certificate = connection.get_peer_certificate()
            names = [] if certificate is None else certificate_names(certificate.to_cryptography())
            tlsProtocol.failVerification(Failure(CertificateNotForHost(error.errors, self._host, names)))
        except Exception:
            tlsProtocol.failVerification(Failure())
