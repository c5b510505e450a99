"""
Session tokens: the one HS256 JWT that unlocks the control plane.

The gateway holds exactly one valid token at a time.  It is issued at
start-up and replaced by C{rotate_token}; a restart or a rotation makes every
earlier token worthless, because its C{jti} is no longer the current one.
"""

from __future__ import annotations

import errno
import hmac
import os
import re
import stat
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import attrs
import jwt
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from openclaw.deferreds import shielded
from openclaw.files import NotARegularFile, PidLock, kind_of, named_uid, read_regular_file, write_atomically
from openclaw.settings.errors import ConfigError
from openclaw.settings.permissions import check_token_directory
from openclaw.timefmt import isoformat
from openclaw.writer import FileWriter, WriterStopped

ISSUER = "openclaw-gateway"
ALGORITHM = "HS256"

_RULE = "━" * 58

#: What a token file holds: nothing yet, or one JWT (three base64url
#: segments) and a newline, as the gateway writes it.  Anything else at
#: C{TOKEN_FILE} is someone else's and is never replaced or removed.
_TOKEN_FILE_CONTENT = re.compile(rb"(?:[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\n?)?")


#: The UTF-8 byte order mark an editor (Notepad) may put first.
_BOM = b"\xef\xbb\xbf"


def token_text(held: bytes) -> bytes:
    """
    What a token file written by hand holds, as C{openclawctl
    --token-file} and the gateway read it: without a UTF-8 byte order
    mark and the blanks around it.
    """
    return held.removeprefix(_BOM).strip()


def is_token_file_content(held: bytes) -> bool:
    """
    Whether C{held}, a file's content, is a token file's: empty, or one
    session token with blanks around it (a CRLF or a space of a file
    written by hand, which C{openclawctl --token-file} reads stripped), so
    that a file C{openclawctl} takes its token from may be replaced by the
    next one.
    """
    return not held or holds_a_token(token_text(held))


#: The most bytes of a token file read: a token is a few hundred.
MAX_TOKEN_FILE_BYTES = 64 * 1024


def holds_a_token(content: bytes) -> bool:
    """
    Whether C{content}, a token file's, is one session token (a JWT: three
    base64url segments) and at most a newline, as the gateway writes it.
    """
    return bool(content) and _TOKEN_FILE_CONTENT.fullmatch(content) is not None


class TokenRejected(Exception):
    """
    A presented token does not open the control plane.  The message is what
    the client is told: C{missing token}, C{invalid token}, C{token expired},
    C{token revoked} or C{token not known here yet} (L{NOT_KNOWN_YET}, with
    what to do); it never says more than that.  C{reason} is the first
    part, the label it is counted under.
    """

    def __init__(self, reason: str, hint: str = "") -> None:
        super().__init__(f"{reason}: {hint}" if hint else reason)
        self.reason = reason


class UntrustedToken(ValueError):
    """
    A token offered for adoption (by a cluster's store) that this gateway
    did not sign: not an HS256 JWT under its C{JWT_SECRET}, or its claims
    are not the ones it says it carries.
    """


# The four reasons.  A fresh exception is raised each time: re-raising one
# shared instance would extend its __traceback__ with every failure's frames
# (and the connections they reference), a leak the fuzz run found.
MISSING = "missing token"
INVALID = "invalid token"
EXPIRED = "token expired"
REVOKED = "token revoked"
#: A token signed with this gateway's secret, not expired, issued after
#: the current one (its C{iat} later): the cluster's newest, which this
#: instance has not applied yet (catching up after a Redis outage, a
#: message late).  Not a failed authentication (nor counted toward the
#: lockout): a client told the token was revoked, or locked out for it,
#: had done right.
NOT_KNOWN_YET = "token not known here yet"
#: The refusals of a token this gateway (or its cluster) signed: no guess
#: (its signature was checked), so not counted toward a connection's
#: failed authentications nor the lockout; a client that kept one after
#: a renewal or a rotation (a dashboard, a second operator) must not lock
#: every operator of its address out.
GENUINE_REFUSALS = frozenset({EXPIRED, REVOKED, NOT_KNOWN_YET})
#: What a client presenting a single gateway's own token, expired, is
#: told: there is no other until a restart (a single gateway renews
#: nothing; C{rotate_token} takes a token in force).
OWN_TOKEN_EXPIRED_HINT = "it was this gateway's current token; restart the gateway for a new one"
NOT_KNOWN_YET_HINT = "this instance has not heard of the cluster's latest rotation; retry in a moment"


@attrs.frozen
class SessionToken:
    """
    One issued token and the claims the gateway needs to know about it.
    """

    token: str = attrs.field(repr=False)
    jti: str
    issued_at: int
    expires_at: int

    @property
    def expires(self) -> str:
        """
        When the token expires, in UTC as ISO 8601 (L{isoformat}).
        """
        return isoformat(self.expires_at)

    def banner(self, token: str | None = None) -> str:
        """
        The block printed on stdout so an operator can copy the token;
        C{token} replaces the token (for the log, which never holds it).
        """
        return (
            f"{_RULE}\n"
            "🔑  OPENCLAW GATEWAY — SESSION TOKEN\n"
            f"{_RULE}\n"
            f"   Token ID : {self.jti}\n"
            f"   Expires  : {self.expires}\n"
            f"   Token    : {self.token if token is None else token}\n"
            f"{_RULE}\n"
        )


class SessionAuthority:
    """
    Issues the current session token and judges the tokens clients present.

    Checking is on every control-plane message, so it has a fast path: the
    only token that can pass is the current one, so a constant-time
    comparison with it (plus the expiry) decides the common case exactly.
    Any other string gets the full PyJWT verification, which tells the client
    precisely why it failed.
    """

    _log = Logger()

    def __init__(
        self,
        secret: bytes,
        ttl_seconds: float,
        clock: Callable[[], float] = time.time,
        token_file: Path | None = None,
        shared: bool = False,
        token_lock: PidLock | None = None,
        writer: FileWriter | None = None,
    ) -> None:
        """
        Reactor thread (or before the reactor runs).

        @param shared: the token is a cluster's (C{REDIS_URL}): other
            instances, perhaps sharing C{token_file}, go on with it after
            this one stops, so the file is left at stop.
        @param token_lock: the lock of C{token_file} (L{lock_token_file}'s,
            taken at start-up, before twistd daemonizes), kept until
            L{discard_token_file} releases it; the first token written
            names this process in it (the daemon's pid).  L{None}: none.
        @param writer: where the token file is written after start-up
            (L{adopt_later}), off the reactor thread; L{None}: on the
            calling thread (a test, a tool).
        """
        self._secret = secret
        self._ttl = ttl_seconds
        self._clock = clock
        self._token_file = token_file
        self._shared = shared
        self._current: SessionToken | None = None
        self._lock = token_lock
        self._writer = writer
        #: The last token (ASCII) this gateway wrote to the token file, or
        #: L{None}: what the file holds, unless someone else wrote it
        #: since.  Written by L{adopt} at start-up, then only by
        #: L{adopt_later}'s jobs, in the writer's thread (one at a time),
        #: and read there (and on the reactor thread, only to tell whether
        #: it is still None: L{restore_token_file}): a job finds the file
        #: holding it, or the current token, or its own, and replaces it
        #: (O(1) however many adoptions wait; a list of them would make
        #: each rotation O(N)).
        self._written: bytes | None = None
        #: The last token (ASCII) adopted with a token file, written to it
        #: or not (the file was another's then): what it should hold, and
        #: what L{restore_token_file} writes.  Writer's thread, as
        #: C{_written}.
        self._adopted: bytes | None = None
        #: A write of a token file gone (L{restore_token_file}) is under
        #: way; the cause of the last one's failure (said once per cause),
        #: or None.
        self._restoring = False
        self._restore_failed: str | None = None

    @property
    def current(self) -> SessionToken:
        """
        The token in force.

        @raise RuntimeError: none has been issued yet.
        """
        if self._current is None:
            raise RuntimeError("no session token has been issued yet")
        return self._current

    @property
    def current_or_none(self) -> SessionToken | None:
        """
        The current token, or L{None} before the first one is known.
        """
        return self._current

    def mint(self) -> SessionToken:
        """
        A new token, signed but not yet in force (see L{adopt}).
        """
        now = int(self._clock())
        jti = str(uuid.uuid4())
        expires_at = now + max(1, round(self._ttl))
        claims = {"iss": ISSUER, "jti": jti, "iat": now, "exp": expires_at}
        token = jwt.encode(claims, self._secret, algorithm=ALGORITHM)
        return SessionToken(token=token, jti=jti, issued_at=now, expires_at=expires_at)

    def check(self, issued: SessionToken) -> None:
        """
        Check that C{issued} is a token this gateway could have minted: an
        HS256 JWT (RFC 7519) signed with its secret, with the C{iss},
        C{jti} and C{exp} claims L{mint} puts in it (checked as presented
        tokens are), equal to the ones C{issued} states.  Its expiry is not
        judged (an expired token is adopted and refused as expired).

        @raise UntrustedToken: it is not.
        """
        try:
            claims = jwt.decode(
                issued.token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iss", "jti"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidSignatureError:
            raise UntrustedToken("it is signed with another JWT_SECRET") from None
        except jwt.InvalidTokenError as e:
            raise UntrustedToken(f"it is not a token this gateway issues ({e})") from None
        if (claims["jti"], claims["exp"], claims.get("iat", issued.issued_at)) != (
            issued.jti,
            issued.expires_at,
            issued.issued_at,
        ):
            raise UntrustedToken("its claims (jti, exp, iat) are not the ones it is stored with")

    def adopt(self, issued: SessionToken) -> None:
        """
        Make C{issued} the current token (in a cluster: the one the cluster
        holds), every other one invalid at once, and write it to the token
        file when there is one.  Blocking (it fsyncs), on the calling
        thread: the gateway's first token, at start-up before anything is
        served (its refusal: L{openclaw.service.StartRefused}); after
        start-up the gateway adopts through L{adopt_later}.

        @raise TokenFileUnwritable: it could not be written; the current
            token is left as it was.
        """
        # The file first: if it cannot be written, the old token stays valid
        # rather than everyone being locked out by a token nobody has.
        if self._token_file is not None:
            if self._lock is not None:
                self._name_holder(self._lock)
            foreign = self._foreign_token_file(accept=issued)
            if foreign is None:
                try:
                    write_token_file(self._token_file, issued.token)
                except OSError as e:
                    raise TokenFileUnwritable(self._token_file, e) from None
                self._written = issued.token.encode("ascii")
            else:
                self._log.warn(
                    "TOKEN_FILE {path} was left as it is ({why}); session token {jti} is not in it",
                    path=str(self._token_file),
                    why=foreign,
                    jti=issued.jti,
                )
            self._adopted = issued.token.encode("ascii")
        self._current = issued

    def adopt_later(self, issued: SessionToken) -> Deferred[None]:
        """
        L{adopt}, its token file checked and written in the writer's thread
        (L{FileWriter.run}), after every write asked of it before: the
        reactor thread is never blocked by the disk (the lock file's pid,
        when first named, is written there too), and of two adoptions
        asked back to back the second is the one on disk and in force.
        C{issued} is made current once its file is written (on the reactor
        thread, when the returned Deferred fires): until then the token
        before it stays valid.  Without a writer or a token file, as
        L{adopt} (at once).  Called on the reactor thread.

        Made current once written even if who asked gave up (cancelled
        the returned Deferred: a command cut short at stop); a failure
        then is logged here, as nothing else would say it.

        @return: a Deferred firing with None once C{issued} is current.
        @raise TokenFileUnwritable: (as a failure) it could not be written
            (the writer stopped included: L{WriterStopped}); the current
            token is left as it was.
        """
        writer, path = self._writer, self._token_file
        if writer is None or path is None:
            try:
                self.adopt(issued)
            except TokenFileUnwritable:
                return fail()
            return succeed(None)
        lock = self._lock
        # The tokens this gateway may find in the file when the job runs:
        # the current one and this one, taken now on the reactor thread,
        # and the last one written (by a job asked before: _written, the
        # writer thread's alone).
        mine = tuple(token.token.encode("ascii") for token in (self._current, issued) if token is not None)
        first = self._current is None
        write_file = writer.write_file

        def job() -> tuple[str | None, OSError | None]:
            # In the writer's thread, as every job: one at a time.
            unnamed = None
            if lock is not None:
                # Its pid, once (a pwrite, no fsync; nothing after the first).
                try:
                    lock.record_pid()
                except OSError as e:
                    unnamed = e
            written = self._written
            foreign = self._judge_token_file(path, mine if written is None else (*mine, written), first)
            if foreign is None:
                if not first:
                    # Its directory made again since start-up as start-up
                    # would refuse it (others may write it): not written
                    # there, as the restorer does not (recheck s45).
                    try:
                        check_token_directory(path, f"TOKEN_FILE {str(path)!r}")
                    except ConfigError as e:
                        raise TokenFileUnwritable(path, OSError(errno.EACCES, str(e))) from None
                try:
                    write_file(path, issued.token + "\n")
                except OSError as e:
                    raise TokenFileUnwritable(path, e) from None
                self._written = issued.token.encode("ascii")
            self._adopted = issued.token.encode("ascii")
            return foreign, unnamed

        def written(outcome: tuple[str | None, OSError | None]) -> None:
            foreign, unnamed = outcome
            if unnamed is not None and lock is not None:
                self._pid_unwritten(lock, unnamed)
            if foreign is not None:
                self._log.warn(
                    "TOKEN_FILE {path} was left as it is ({why}); session token {jti} is not in it",
                    path=str(path),
                    why=foreign,
                    jti=issued.jti,
                )
            self._current = issued

        def refused(reason: Failure) -> Failure:
            # The writer stopped (or a job failed as no write does): said
            # as a write that failed.
            if isinstance(reason.value, OSError) and not isinstance(reason.value, TokenFileUnwritable):
                return Failure(TokenFileUnwritable(path, reason.value))
            return reason

        def dropped(reason: Failure) -> None:
            if isinstance(reason.value, TokenFileUnwritable) and reason.value.stopping:
                self._log.info(
                    "session token {jti} was not made current: the gateway is stopping and its write to "
                    "TOKEN_FILE had not begun; token {kept} stays valid until the gateway stops",
                    jti=issued.jti,
                    kept=self._current.jti if self._current is not None else "(none)",
                )
                return
            self._log.failure(
                "session token {jti} was not made current, and token {kept} stays valid (the command that "
                "asked for it was cut short meanwhile)",
                reason,
                jti=issued.jti,
                kept=self._current.jti if self._current is not None else "(none)",
            )

        running = writer.run(job, what=f"TOKEN_FILE {path}")
        running.addErrback(refused)
        adopted: Deferred[None] = running.addCallback(written)
        return shielded(adopted, dropped)

    def issue_later(self) -> Deferred[SessionToken]:
        """
        L{issue}, its token file written in the writer's thread
        (L{adopt_later}).  Called on the reactor thread.

        @return: a Deferred firing with the new token once it is current.
        @raise TokenFileUnwritable: (as a failure) it could not be
            written; the current token is left as it was.
        """
        issued = self.mint()
        return self.adopt_later(issued).addCallback(lambda _: issued)

    def _name_holder(self, lock: PidLock) -> None:
        try:
            lock.record_pid()
        except OSError as e:
            self._pid_unwritten(lock, e)

    def _pid_unwritten(self, lock: PidLock, e: OSError) -> None:
        """
        Log that this process's id could not be written to C{lock}'s file
        (C{e}).  Reactor thread.
        """
        self._log.warn(
            "this gateway's pid could not be written to {path} ({error}): a gateway turned away "
            "from TOKEN_FILE will not say which process holds it",
            path=str(lock.path),
            error=e.strerror,
        )

    def issue(self) -> SessionToken:
        """
        Issue a new token, making every earlier one invalid at once, and
        write it to the token file when there is one.
        """
        issued = self.mint()
        self.adopt(issued)
        return issued

    def verify(self, presented: object) -> str:
        """
        Check a presented token (whitespace around it ignored: a token
        file's newline).  One with another C{jti} than the current
        token's is revoked when issued before it (its C{iat} no later), and
        not known here yet (L{NOT_KNOWN_YET}) when issued after it: a
        rotation elsewhere in the cluster this instance has not applied.

        @return: the C{jti} of the token, for the audit log.
        @raise TokenRejected: it does not open the control plane.
        """
        current = self._current
        if presented is None or presented == "":
            raise TokenRejected(MISSING)
        if not isinstance(presented, str) or current is None:
            raise TokenRejected(INVALID)
        if presented.isascii() and hmac.compare_digest(presented, current.token):
            if self._clock() >= current.expires_at:
                # A cluster renews its token; a single gateway none.
                raise TokenRejected(EXPIRED, "" if self._shared else OWN_TOKEN_EXPIRED_HINT)
            return current.jti
        return self._verify_slowly(presented, current)

    def _verify_slowly(self, presented: str, current: SessionToken) -> str:
        stripped = presented.strip(" \t\r\n")
        if stripped != presented:
            # A token file's newline (or a copy's spaces) around it: a JWT
            # holds no whitespace (RFC 7519 section 7.1), so the token is
            # the rest, as HTTP strips the spaces around a header's value.
            return self.verify(stripped)
        # PyJWT checks the signature (HS256 only: "none", HS512 and the rest
        # are refused), the issuer and that exp, iss and jti are there; the
        # expiry is judged here with the gateway's own clock, the one that
        # also judges the fast path.
        try:
            claims = jwt.decode(
                presented,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["exp", "iss", "jti"], "verify_exp": False, "verify_iat": False},
            )
        except jwt.InvalidTokenError:
            raise TokenRejected(INVALID) from None
        expires_at, jti = claims["exp"], claims["jti"]
        if type(expires_at) not in (int, float) or type(jti) is not str:
            raise TokenRejected(INVALID)
        if self._clock() >= expires_at:
            raise TokenRejected(EXPIRED)
        if not hmac.compare_digest(jti.encode(), current.jti.encode()):
            issued_at = claims.get("iat")
            if (
                self._shared
                and isinstance(issued_at, int | float)
                and not isinstance(issued_at, bool)
                and issued_at > current.issued_at
            ):
                raise TokenRejected(NOT_KNOWN_YET, NOT_KNOWN_YET_HINT)
            # A single gateway hears of no rotation elsewhere: a token newer
            # than its own (another gateway's with the same JWT_SECRET, or
            # its previous run's with the clock set back) is no more valid.
            raise TokenRejected(REVOKED)
        # Same jti and a good signature but not the same string: a token
        # re-encoded with other claims by someone holding the secret.
        raise TokenRejected(INVALID)

    def restore_token_file(self) -> None:
        """
        Write the token file again when it is gone while the gateway runs
        (an C{rm}, a cleaner of old files in C{/tmp} or C{/run}): with the
        last token adopted (the current one, or the one a rotation under
        way makes current; never an older one), in the writer's thread,
        after the writes asked before it; a warning says so.  Nothing when
        there is no token file, when this gateway never wrote it, or when
        something is at its path; not into a directory others may write
        (L{check_token_directory}, as at start-up).  A write that fails is
        said once per cause (warning) until one succeeds.  Reactor thread
        (one C{lstat}).
        """
        path, writer = self._token_file, self._writer
        if path is None or self._written is None or self._restoring or _present(path):
            return
        self._restoring = True
        write_file = writer.write_file if writer is not None else None

        def job() -> str | None:
            # In the writer's thread, as the adoptions' jobs that set it.
            adopted = self._adopted
            if adopted is None or _present(path):
                return None
            # Its directory made again as start-up would refuse it (one
            # others may write: they could replace the token; recheck s45).
            check_token_directory(path, f"TOKEN_FILE {str(path)!r}")
            token = adopted.decode("ascii")
            if write_file is None:
                write_token_file(path, token)
            else:
                write_file(path, token + "\n")
            self._written = adopted
            return token

        def restored(token: str | None) -> None:
            self._restoring = False
            self._restore_failed = None
            if token is None:
                return
            current = self._current
            self._log.warn(
                "TOKEN_FILE {path} was removed while the gateway ran (an rm, a cleaner of old files in /tmp or "
                "/run): written again with the current token (id {jti}); keep cleaners away from it",
                path=str(path),
                jti=current.jti if current is not None and current.token == token else "(the last written)",
            )

        def failed(reason: Failure) -> None:
            self._restoring = False
            error = reason.value
            if isinstance(error, WriterStopped):
                return
            # Said once per cause: a directory gone, then made again so that
            # others may write it, is a new cause with its own fix.
            cause = f"errno {error.errno}" if isinstance(error, OSError) else str(error)
            if self._restore_failed == cause:
                return
            self._restore_failed = cause
            if isinstance(error, ConfigError):
                self._log.warn(
                    "TOKEN_FILE {path} was removed while the gateway ran and is not written again: {error}; once "
                    "that is done, the gateway writes it at its next check",
                    path=str(path),
                    error=str(error),
                )
                return
            self._log.warn(
                "TOKEN_FILE {path} was removed while the gateway ran and cannot be written again ({error}): "
                "operators have no token to read until it is; make its directory again, writable by the gateway's "
                "user: the gateway writes it at its next check (a restart before then is refused)",
                path=str(path),
                error=(error.strerror or str(error)) if isinstance(error, OSError) else str(error),
            )

        if writer is None:
            try:
                restored(job())
            except (OSError, ConfigError):
                failed(Failure())
            return
        writer.run(job, what=f"TOKEN_FILE {path}").addCallbacks(restored, failed)

    def discard_token_file(self) -> None:
        """
        Remove the token file on a clean shutdown, so no stale token lies
        around: only if it still holds this gateway's current token (another
        gateway, or an operator, may have written it since); otherwise it is
        left, and the log says why.  In a cluster it is left: the token stays
        valid for the other instances, which may read the same file.

        Then the token file's lock (C{token_lock}) is released, its
        lock file removed.
        """
        try:
            self._discard_token_file()
        finally:
            self.release_token_file()

    def release_token_file(self) -> None:
        """
        Release the token file's lock (C{token_lock}), its lock file
        removed, leaving the token file as it is; again, nothing.
        """
        if self._lock is not None:
            lock, self._lock = self._lock, None
            try:
                lock.release()
            except OSError as e:
                # Released all the same: only the file is left.
                self._log.warn(
                    "the lock file {path} could not be removed ({error}); it blocks no other gateway",
                    path=str(lock.path),
                    error=e.strerror,
                )

    def _discard_token_file(self) -> None:
        if self._token_file is None:
            return
        if self._shared:
            if _present(self._token_file):
                self._log.info(
                    "TOKEN_FILE {path} was left in place: the token is the cluster's and stays valid "
                    "for its other instances",
                    path=str(self._token_file),
                )
            return
        if self._current is None:
            why: str | None = "this gateway never wrote a token to it"
        else:
            why = self._foreign_token_file(accept=None)
        if why is None:
            try:
                self._token_file.unlink()
            except (FileNotFoundError, NotADirectoryError):
                pass  # missing, or no directory there any more (a file in its place)
            except OSError as e:
                self._log.warn(
                    "TOKEN_FILE {path} could not be removed ({error}): it holds a token no longer valid; "
                    "remove it, and let the gateway's user write in its directory",
                    path=str(self._token_file),
                    error=e.strerror or str(e),
                )
        elif _present(self._token_file):
            self._log.warn("TOKEN_FILE {path} was left in place: {why}", path=str(self._token_file), why=why)

    def _signed_elsewhere(self, held: bytes) -> bool:
        """
        Whether C{held}, a token file's content, is a token still in force
        (its C{exp} not past) that this gateway's C{JWT_SECRET} did not
        sign.  In a cluster the file is the cluster's: an instance started
        with another secret (after Redis lost the cluster's token, so that
        nothing refused it at start-up) replaced it with its own, and every
        operator using the file was refused by the other instances (trial
        s25).
        """
        text = token_text(held).decode("ascii")
        if not text:
            return False
        try:
            claims = jwt.decode(text, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return False
        expires = claims.get("exp") if isinstance(claims, dict) else None
        if not isinstance(expires, (int, float)) or expires <= self._clock():
            return False
        try:
            jwt.decode(text, self._secret, algorithms=[ALGORITHM], options={"verify_exp": False, "verify_iat": False})
        except jwt.InvalidSignatureError:
            return True
        except jwt.InvalidTokenError:
            return False
        return False

    def _foreign_token_file(self, accept: SessionToken | None) -> str | None:
        """
        Why the token file may not be replaced or removed now, or L{None}
        when it may: it is missing, or a regular file holding this
        gateway's current token (or C{accept}'s).  Before the first token,
        any file L{check_token_file} accepts may be replaced.  A file this
        gateway cannot read (one another user wrote, mode 0600) may hold
        anything: it is not replaced, and the reason says what to do.
        """
        assert self._token_file is not None
        mine = tuple(token.token.encode("ascii") for token in (self._current, accept) if token is not None)
        return self._judge_token_file(self._token_file, mine, self._current is None)

    def _judge_token_file(self, path: Path, mine: tuple[bytes, ...], first: bool) -> str | None:
        """
        Why the token file at C{path} may not be replaced or removed now,
        or L{None} when it may (L{_foreign_token_file}): C{mine} are the
        tokens (ASCII) it may hold, C{first} that no token is current yet.
        Reads the file and nothing of the authority's state but its secret,
        clock and C{shared}, none of which changes: runs on the reactor
        thread (L{adopt}, at stop) or the writer's (L{adopt_later}).
        """
        try:
            held = read_token_file(path)
        except UnsafeTokenFile as e:
            return e.reason
        except NotADirectoryError:
            # A path through a file: no file can be there (as for a missing
            # one); writing it fails and says so.
            return None
        except PermissionError as e:
            user = os.geteuid()
            return (
                f"this gateway's user, {named_uid(user)}, may not read it ({e.strerror}), so it may hold anything: "
                f"give it back to that user (chown {user}) or remove it"
            )
        except OSError as e:
            return f"it cannot be read ({e.strerror or e})"
        if held is None:
            return None
        if first and is_token_file_content(held):
            if self._shared and self._signed_elsewhere(held):
                return (
                    "it holds a session token in force signed with another JWT_SECRET: the cluster's, if this "
                    "instance's JWT_SECRET is not the cluster's, or another gateway's: check JWT_SECRET (and "
                    "REDIS_URL, CLUSTER_NAME); remove the file if it is stale"
                )
            return None
        if token_text(held) in mine:
            return None
        return "it no longer holds this gateway's session token: another gateway or an operator wrote it"


def _present(path: Path) -> bool:
    """
    Whether something (a link included) is at C{path}: true when that
    cannot be told (a directory this user may not search).
    """
    try:
        os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return True
    return True


def write_token_file(path: Path, token: str, *, keep_owner: bool = False) -> None:
    """
    Replace C{path} atomically with the token and a newline, mode 0600
    (L{write_atomically}); with C{keep_owner}, owned by the user and group
    of the file it replaces (openclawctl's, run as root on the gateway's
    C{TOKEN_FILE}).

    Blocking (it fsyncs), on the calling thread: the gateway's first
    token at start-up, before anything is served (L{SessionAuthority.adopt}),
    and C{openclawctl}'s; after start-up the gateway writes it in its
    writer's thread (L{SessionAuthority.adopt_later}).

    @raise openclaw.files.OwnerNotKept: C{keep_owner}, and this process
        may not give the file to that owner.
    @raise OSError: it cannot be written; C{path} is left as it was.
    """
    write_atomically(path, token + "\n", keep_owner=keep_owner)


def token_file_lock_path(token_file: Path) -> Path:
    """
    The lock file of C{token_file}: the same path with C{.lock} appended.
    """
    return Path(f"{token_file}.lock")


def lock_token_file(token_file: Path) -> PidLock:
    """
    Hold C{token_file} for this gateway, for as long as the process runs
    or until L{PidLock.release}: L{PidLock} on L{token_file_lock_path}, so
    that a second gateway given the same C{TOKEN_FILE} is turned away
    instead of replacing (and at its stop removing) the token of the one
    running.  (Not in a cluster: its instances share the file.)

    @raise openclaw.files.LockHeld: another running gateway holds it.
    @raise openclaw.files.NotALockFile: the lock file's path holds
        something else.
    @raise OSError: the lock file cannot be created or opened.
    """
    return PidLock.acquire(token_file_lock_path(token_file))


class TokenFileUnwritable(OSError):
    """
    A new token could not be written to C{TOKEN_FILE}, so it was not made
    current: the token before it stays valid (L{SessionAuthority.adopt}).
    An C{OSError} (with the write's C{errno}), as the write's own error was.

    @ivar error: why, as the system said it (C{"No space left on device"}).
    @ivar stopping: it was not written because the gateway is stopping
        (L{WriterStopped}: asked once its file writer closed, or dropped
        then, not begun), not because it could not be.
    """

    def __init__(self, path: Path, error: OSError) -> None:
        self.error = error.strerror or str(error)
        self.stopping = isinstance(error, WriterStopped)
        super().__init__(error.errno, f"the new token could not be written to {path} ({self.error})")


class RotationUnderWay(Exception):
    """
    A rotation asked while another is under way (its new token being
    written: to TOKEN_FILE, in a cluster to the store first): refused at
    once, nothing changed.  At most one rotation is written at a time, so
    that pipelined C{rotate_token}s on a slow disk cannot pile up (review
    s33: 4,936 of them waiting, 3.3 GB).  The message says what to do.
    """

    def __init__(self) -> None:
        super().__init__(
            "nothing was rotated: another rotate_token is under way (its new token being written); "
            "the current token stays valid: retry once that rotate_token is answered"
        )


class UnsafeTokenFile(Exception):
    """
    What is at C{TOKEN_FILE} is not the gateway's to replace: the reason
    says what it is.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_token_file(path: Path) -> bytes | None:
    """
    What the token file at C{path} holds, or L{None} when there is none;
    a symbolic link is not followed and nothing but a regular file is
    read.

    @raise UnsafeTokenFile: it is not a regular file, or is too large.
    @raise OSError: it cannot be examined or read.
    """
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeTokenFile(f"it is {kind_of(info.st_mode)}, not a regular file")
    try:
        return read_regular_file(path, MAX_TOKEN_FILE_BYTES)
    except FileNotFoundError:
        return None
    except NotARegularFile as e:
        raise UnsafeTokenFile(str(e)) from None


def check_token_file(path: Path) -> None:
    """
    Check, before the gateway starts, that it may write its token to
    C{path}: nothing is there, or a regular file that is empty or holds
    one token (left by an earlier run).  Any other file is not the
    gateway's, and is never overwritten.

    @raise UnsafeTokenFile: it may not.
    """
    try:
        held = read_token_file(path)
    except OSError as e:
        raise UnsafeTokenFile(f"it cannot be read ({e.strerror})") from None
    if held is not None and not is_token_file_content(held):
        raise UnsafeTokenFile("it holds something other than a session token")
