"""
The gateway's listeners as an operator names them, and the one-line error
when one cannot be had.

A port already in use is the most common start-up failure.  It must be told
in one line, on the terminal that ran C{twistd}, naming the setting and the
way out, whether the gateway runs in the foreground or as a daemon (which
detaches before any service starts): so the ports given as C{--port} /
C{--api-port} are tried here, before twistd forks (L{check_free}), and a
listener that still fails when the service starts (an endpoint string, or a
port taken in between) fails with the same wording (L{NamedEndpoint}).

The files a TLS listener reads (its key, certificate, chain) are checked
first (L{tls_file_problem}): a device or a FIFO there would hang start-up.

And how the process's file descriptors (C{RLIMIT_NOFILE}) are shared
between the listeners (L{share_descriptors}), so that no flood of either
port can make the process run out of them (C{EMFILE}: then nobody, not
even an operator, can connect).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.python.failure import Failure
from twisted.python.lockfile import FilesystemLock
from zope.interface import implementer

from openclaw.addresses import address_family, bind_address
from openclaw.files import MAX_UNIX_PATH_BYTES, NotARegularFile, read_regular_file
from openclaw.settings import Settings

#: The listen backlog of the TCP listeners the gateway makes itself (the
#: ports given as C{--port} and C{--api-port}, and the workers' shared
#: ones): connections the kernel completes before the
#: reactor accepts them.  Twisted's default, 50, overflowed under a
#: flood of new connections, and a client whose handshake was dropped
#: waited a second for its retry (hostile trial s45).  nginx's default on
#: Linux; the kernel caps it at C{net.core.somaxconn}.  An endpoint
#: string sets its own (C{backlog=}).
LISTEN_BACKLOG = 511


class CannotListen(SystemExit):
    """
    A listener cannot be had: the process ends with status 1 and this one
    line (C{str()}), no traceback.
    """

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line

    def __str__(self) -> str:
        return self.line


class PortTaken(CannotListen):
    """
    A C{--workers} worker cannot listen on a port of the gateway: another
    program (not this gateway's workers, which share the port) listens
    there (L{openclaw.cluster.workers.ReusePortEndpoint}).  The worker
    ends with L{openclaw.cluster.workers.PORT_TAKEN_STATUS}.
    """


@attrs.frozen
class Listener:
    """
    One listener as an operator configures it.

    @ivar where: what it listens on, as shown (C{"[::]:18790"}, or an
        endpoint string).
    @ivar setting: the setting that chose it (C{"API_PORT"}).
    @ivar option: the command-line option that overrides it (C{"--api-port"}).
    @ivar source: where the setting's value came from, as a refusal of a
        bad value says it (C{"from the environment"},
        L{openclaw.settings.Settings.sources}), or C{"the default"};
        empty: not said.
    """

    where: str
    setting: str
    option: str
    source: str = ""

    @property
    def named(self) -> str:
        """
        The setting and where its value came from: C{"API_PORT, from the
        environment"}.
        """
        return f"{self.setting}, {self.source}" if self.source else self.setting

    def failure_line(self, error: BaseException) -> str:
        """
        C{openclaw: cannot listen on [::]:18790 (API_PORT, from the
        environment): address already in use; is another gateway running?
        choose another port with --api-port}.
        """
        cause = getattr(error, "socketError", None) or error
        code = getattr(cause, "errno", None)
        target = "port" if self.option in ("--port", "--api-port") else "endpoint"
        if target == "port" and (isinstance(cause, socket.gaierror) or code == errno.EADDRNOTAVAIL):
            # The address, not the port: INTERFACE names no address of this host.
            what = "this host has no such address" if code == errno.EADDRNOTAVAIL else getattr(cause, "strerror", cause)
            return (
                f"openclaw: cannot listen on {self.where} ({self.named}): {what}; set INTERFACE "
                "(--interface) to an address of this host (0.0.0.0 or :: for every address)"
            )
        if code == errno.EINVAL and self.where.lower().startswith("[fe80:") and "%" not in self.where:
            return (
                f"openclaw: cannot listen on {self.where} ({self.named}): a link-local IPv6 address needs its "
                "interface; set INTERFACE (--interface) to the address and its zone, such as fe80::1%eth0"
            )
        lock = unix_lock_file(self.where)
        if lock is not None and not isinstance(cause, OSError):
            # The one failure of Twisted's UNIX port that is no socket
            # error: its lock beside the socket held (twisted.python.lockfile).
            reason = (
                f"another process holds its lock {lock!r} (a gateway listening there, or one still ending: "
                "retry in a moment);"
            )
        elif code == errno.EADDRINUSE:
            reason = "address already in use; is another gateway running?"
        elif code == errno.EACCES:
            reason = "permission denied (ports below 1024 need root or CAP_NET_BIND_SERVICE);"
        elif code == errno.EADDRNOTAVAIL:
            reason = "this host has no such address;"
        else:
            reason = f"{getattr(cause, 'strerror', None) or cause};"
        return f"openclaw: cannot listen on {self.where} ({self.named}): {reason} choose another {target} with {self.option}"


def check_free(listener: Listener, interface: str, port: int) -> None:
    """
    Try to bind C{interface}:C{port} as the gateway's TCP listener will
    (C{SO_REUSEADDR}, as Twisted sets it), and let it go at once.  Its
    port's lock (L{lock_port}) is the caller's to take, once per port.

    @raise CannotListen: it cannot be bound.
    """
    family = address_family(interface)
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(bind_address(interface, port))
    except OSError as e:
        raise CannotListen(listener.failure_line(e)) from None


def lock_port(listener: Listener, port: int) -> socket.socket | None:
    """
    The lock of TCP port C{port} on this host (its network namespace),
    which an openclaw gateway holds from its start to its end, however it
    ends: a UNIX socket bound to C{"\\0openclaw port PORT"} in Linux's
    abstract namespace, which only one socket can hold (unix(7)) and the
    kernel frees with the last process holding it.  A port's listening
    socket alone does not tell a gateway whose listener is not up yet (a
    C{--workers} gateway's workers starting, a single one between its
    checks and its listen, a cluster's instance waiting for Redis): two
    started together took the same port, or a C{--workers} gateway's
    C{SO_REUSEPORT} workers joined another's, each port's address its own
    (C{::} beside C{127.0.0.1}).  So one gateway per port number per host,
    whatever the addresses.  L{None} on other systems, and for port 0 (the
    kernel's choice, made later).

    @raise CannotListen: another gateway holds it.
    """
    if port == 0 or not sys.platform.startswith("linux"):
        return None
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        lock.bind(f"\0openclaw port {port}")
    except OSError as e:
        lock.close()
        if e.errno == errno.EADDRINUSE:
            raise CannotListen(
                f"openclaw: cannot listen on {listener.where} ({listener.named}): another openclaw gateway holds "
                f"port {port} on this host (starting, listening at another of its addresses, or stopping: one "
                "holds its ports until its calls have drained, SHUTDOWN_GRACE_SECONDS at most); stop it or wait "
                f"for it to end, or choose another port with {listener.option}"
            ) from None
        raise CannotListen(listener.failure_line(e)) from None
    return lock


@implementer(IStreamServerEndpoint)
@attrs.frozen
class NamedEndpoint:
    """
    An endpoint that fails to listen with L{CannotListen}, in the
    listener's words, instead of a bare L{CannotListenError}.
    """

    endpoint: IStreamServerEndpoint
    listener: Listener

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        listening: Deferred[IListeningPort] = self.endpoint.listen(protocolFactory)
        return listening.addErrback(self._failed)

    def _failed(self, failure: Failure) -> Failure:
        error = failure.value
        if isinstance(error, (CannotListenError, OSError)):
            # OSError: a unix: endpoint's lock file (twisted.python.lockfile)
            # that cannot be made, past L{unix_socket_problem}'s checks.
            if isinstance(getattr(error, "socketError", None), OSError):
                # Its bind failed, once it took the lock beside the socket:
                # that lock is this listen's own (one held already, even by
                # another listener of this process, fails before the bind).
                _let_go_of_unix_lock(self.listener.where)
            return Failure(CannotListen(self.listener.failure_line(error)))
        return failure


def _let_go_of_unix_lock(description: str) -> None:
    """
    Remove the lock a C{unix:} endpoint that failed to listen took beside
    its socket, when this process holds it: Twisted's UNIX port keeps it
    when its C{bind} fails, and the next start, finding it held by a dead
    process, removes whatever socket is at the path (another program's,
    live: re-attack s31) before binding there.
    """
    lock = unix_lock_file(description)
    if lock is not None:
        # ValueError: not this process's (another's, held: left alone).
        with contextlib.suppress(OSError, ValueError):
            FilesystemLock(lock).unlock()


def unix_socket_address(description: str) -> str | None:
    """
    The socket path of a C{unix:} server endpoint string, as given; None
    for another endpoint (or one naming none: the parser says so).
    """
    fields, named = endpoint_fields(description)
    if fields[0] != "unix":
        return None
    return (fields[1] if len(fields) > 1 else named.get("address")) or None


def unix_lock_file(description: str) -> str | None:
    """
    The lock file Twisted's C{unix:} server endpoint takes beside its
    socket (C{<path>.lock}, unless C{lockfile=0}); None for another
    endpoint.
    """
    address = unix_socket_address(description)
    fields, named = endpoint_fields(description)
    wanted = fields[4] if len(fields) > 4 else named.get("lockfile", "1")
    if address is None or wanted == "0":
        return None
    return address + ".lock"


#: The most bytes of each file a TLS listener (C{ssl:}) reads at start-up:
#: a key, a certificate and its chain are a few KB.
MAX_TLS_FILE_BYTES = 1024 * 1024

#: The parameters of Twisted's C{ssl:} server endpoint, in the order it
#: takes them unnamed (C{twisted.internet.endpoints.serverFromString}).
_SSL_PARAMETERS = (
    "port",
    "privateKey",
    "certKey",
    "sslmethod",
    "interface",
    "backlog",
    "extraCertChain",
    "dhParameters",
)
#: Those of them that name a file it reads.
_SSL_FILES = ("privateKey", "certKey", "extraCertChain", "dhParameters")


def endpoint_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """
    The fields of a server endpoint string, as C{serverFromString}
    documents them: separated by C{:}, a field with an C{=} is C{name=value}
    (a later C{=} is part of the value), and C{\\} takes the next
    character as it is (C{\\:}, C{\\=}).  C{"ssl:443:privateKey=k.pem"}
    is C{(["ssl", "443"], {"privateKey": "k.pem"})}.
    """
    fields: list[str] = []
    named: dict[str, str] = {}
    current = ""
    name: str | None = None
    characters = iter(description)
    for character in characters:
        if character == "\\":
            current += next(characters, "")
        elif character == ":":
            if name is None:
                fields.append(current)
            else:
                named[name] = current
            current, name = "", None
        elif character == "=" and name is None:
            name, current = current, ""
        else:
            current += character
    if name is None:
        fields.append(current)
    else:
        named[name] = current
    return fields, named


def tls_files(description: str) -> list[tuple[str, str]]:
    """
    The files Twisted's C{ssl:} endpoint named by C{description} reads when
    it is parsed, as C{(parameter, path)}: C{privateKey} (default
    C{server.pem}), C{certKey} (default: the C{privateKey}), and
    C{extraCertChain} and C{dhParameters} when given; none for any other
    endpoint.
    """
    fields, named = endpoint_fields(description)
    if not fields or fields[0] != "ssl":
        return []
    given = dict(zip(_SSL_PARAMETERS, fields[1:], strict=False))
    given.update(named)
    given.setdefault("privateKey", "server.pem")
    given.setdefault("certKey", given["privateKey"])
    return [(parameter, given[parameter]) for parameter in _SSL_FILES if parameter in given]


def tls_file_problem(description: str) -> tuple[str, str] | None:
    """
    What is wrong with a file a TLS listener would read (L{tls_files}), as
    C{(parameter, reason)}, or None: each must be a regular file (links
    followed) of at most L{MAX_TLS_FILE_BYTES}, read without waiting on it
    (L{read_regular_file}), checked before Twisted's parser reads it whole,
    which never ends on C{/dev/zero} and waits for a FIFO's writer.  A file
    that cannot be opened (missing) is left to the parser to report.
    """
    for parameter, name in tls_files(description):
        try:
            read_regular_file(Path(name), MAX_TLS_FILE_BYTES, follow_links=True)
        except NotARegularFile as e:
            return parameter, f"its {parameter} {name!r} is refused: {e}"
        except OSError:
            continue
    return None


def tcp_address(description: str) -> tuple[str, int] | None:
    """
    The interface and port a C{tcp:}, C{tcp6:} or C{ssl:} server endpoint
    string binds (Twisted's defaults: every IPv4 address, C{::} for
    C{tcp6}), for L{check_free} and L{lock_port} before anything is made at
    start-up; port 0 (any: its interface checked, no port locked) too;
    None for another endpoint or a port the parser will refuse.
    """
    fields, named = endpoint_fields(description)
    if fields[0] not in ("tcp", "tcp6", "ssl"):
        return None
    try:
        port = int(fields[1] if len(fields) > 1 else named.get("port", ""))
    except ValueError:
        return None
    if not 0 <= port < 65536:
        return None
    return named.get("interface") or ("::" if fields[0] == "tcp6" else "0.0.0.0"), port


def unix_socket_problem(description: str) -> str | None:
    """
    What is wrong with the path of a C{unix:} server endpoint string, found
    before anything is made at start-up (so a refusal leaves nothing), or
    None: longer than a socket's address holds (L{MAX_UNIX_PATH_BYTES}),
    in a directory that does not exist, or one this process may not create
    a file in (the socket and Twisted's C{.lock} beside it).  Any other
    endpoint: None.
    """
    fields, named = endpoint_fields(description)
    if fields[0] != "unix":
        return None
    address = fields[1] if len(fields) > 1 else named.get("address")
    if not address:
        return None  # the parser says what is missing
    size = len(os.fsencode(address))
    if size > MAX_UNIX_PATH_BYTES:
        return (
            f"its path is {size} bytes long, and a UNIX socket's is at most {MAX_UNIX_PATH_BYTES} (unix(7)); "
            "choose a shorter path"
        )
    directory = os.path.dirname(os.path.abspath(address))
    if not os.path.isdir(directory):
        return f"its directory {directory!r} does not exist; create it (writable by the gateway's user)"
    if not os.access(directory, os.W_OK | os.X_OK):
        return (
            f"the gateway's user may not create the socket in {directory!r}; choose a directory it may write "
            "(such as /run/openclaw)"
        )
    return None


#: Descriptors kept out of both listeners' reach whatever C{RLIMIT_NOFILE}
#: is (at least; an eighth of the limit when that is more): the listening
#: sockets, log and state files, the consumers' database, Redis, health
#: checks' provider connections.  (The providers' idle pooled connections
#: have a share of their own: L{share_descriptors}.)
MIN_RESERVED_DESCRIPTORS = 64
#: TCP connections the control listener allows beyond MAX_CONNECTIONS, for
#: opening handshakes under way (each bounded by HANDSHAKE_TIMEOUT_SECONDS)
#: and refusals being answered.
HANDSHAKE_HEADROOM = 256


@attrs.frozen
class DescriptorShares:
    """
    How many connections each listener may hold at once, and how many idle
    provider connections the pool may keep, so that the process never runs
    out of file descriptors.

    @ivar limit: the soft C{RLIMIT_NOFILE} they were computed for
        (L{None}: unlimited).
    @ivar control: TCP connections the control listener may hold (opening
        handshakes, refusals being told why and open connections).
    @ivar api: connections the API listener may hold (0: no API listener).
    @ivar pool_per_host: idle connections the providers' pool may keep per
        provider host (C{HTTPConnectionPool.maxPersistentPerHost}); at most
        C{UPSTREAM_POOL_SIZE} (0: no pool was counted).
    @ivar pool_hosts: the provider hosts counted (scheme, host, port).
    """

    limit: int | None
    control: int
    api: int
    pool_per_host: int = 0
    pool_hosts: int = 0


def nofile_limit() -> int | None:
    """
    This process's soft C{RLIMIT_NOFILE}, read now; L{None} when unlimited.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def share_descriptors(
    limit: int | None, control: int, api: int, pool_hosts: int = 0, pool_size: int = 0
) -> DescriptorShares:
    """
    Share C{limit} descriptors between the listeners, each capped at what
    it is configured for (C{control}: C{MAX_CONNECTIONS} plus the
    handshake headroom; C{api}: C{API_MAX_CONNECTIONS}, 0 without an API
    listener), and the idle connections of the providers' pool
    (C{pool_size}: C{UPSTREAM_POOL_SIZE} per host, for C{pool_hosts}
    provider hosts; 0 hosts: no pool counted).

    An eighth of the limit (at least L{MIN_RESERVED_DESCRIPTORS}) is kept
    for the process's own files and sockets.  Of the rest the control
    listener may take a quarter (all of it without an API listener).  Of
    what it leaves, the pool's idle connections may take a quarter
    (C{pool_size} per host at most, at least 1), and the API the rest,
    counting two descriptors per connection, since a call in flight also
    holds a connection to its provider.  Idle pooled connections outlive
    the calls that made them (C{UPSTREAM_IDLE_SECONDS}): calls to one
    provider may leave a host's share idle while calls to another fill the
    API's.  Each listener gets at least one.

    With the defaults and two provider hosts: 256 gives 48 control and 54
    API connections and 18 idle per host; 1024 gives 224, 252 and 84;
    65536 leaves all at their defaults (4352, 4096 and 128).
    """
    if limit is None:
        return DescriptorShares(None, control, api, pool_size if pool_hosts else 0, pool_hosts)
    reserve = max(MIN_RESERVED_DESCRIPTORS, limit // 8)
    spare = max(0, limit - reserve)
    control_share = min(control, max(1, spare // 4 if api else spare))
    rest = spare - control_share
    pool_per_host = min(pool_size, max(1, rest // 4 // pool_hosts)) if pool_hosts and pool_size else 0
    api_share = min(api, max(1, (rest - pool_per_host * pool_hosts) // 2)) if api else 0
    return DescriptorShares(limit, control_share, api_share, pool_per_host, pool_hosts)


def provider_hosts(settings: Settings) -> int:
    """
    How many hosts the providers' pool may keep connections to: the
    distinct (scheme, host, port) of the providers' base URLs, as
    C{HTTPConnectionPool} keys its connections.
    """
    hosts = set()
    for configured in settings.providers.values():
        parts = urlsplit(configured.base_url)
        try:
            port = parts.port
        except ValueError:
            port = None
        hosts.add((parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)))
    return len(hosts)


def descriptor_shares(settings: Settings, api: bool, limit: int | None = None) -> DescriptorShares:
    """
    L{share_descriptors} for these settings (C{MAX_CONNECTIONS} plus
    L{HANDSHAKE_HEADROOM}, C{API_MAX_CONNECTIONS} when C{api},
    C{UPSTREAM_POOL_SIZE} for each of the L{provider_hosts}) and C{limit}
    (default: this process's L{nofile_limit}, read now).
    """
    return share_descriptors(
        nofile_limit() if limit is None else limit,
        settings.max_connections + HANDSHAKE_HEADROOM,
        settings.api_max_connections if api else 0,
        provider_hosts(settings),
        settings.upstream_pool_size,
    )
