"""
Session tokens: issuing, the banner, the token file, and every way a forged
or stale token is refused.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import uuid
from pathlib import Path

import jwt
from twisted.trial.unittest import SynchronousTestCase

from openclaw.session import (
    ISSUER,
    NOT_KNOWN_YET,
    OWN_TOKEN_EXPIRED_HINT,
    SessionAuthority,
    TokenFileUnwritable,
    TokenRejected,
)

SECRET = b"k" * 32
OTHER_SECRET = b"o" * 32
NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IssueTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.authority = SessionAuthority(SECRET, 24 * 3600, clock=self.clock)

    def test_claims(self) -> None:
        """
        The token is an HS256 JWT from openclaw-gateway with a uuid4 jti,
        iat now and exp now + TTL.
        """
        issued = self.authority.issue()
        header = jwt.get_unverified_header(issued.token)
        self.assertEqual(header["alg"], "HS256")
        claims = jwt.decode(
            issued.token,
            SECRET,
            algorithms=["HS256"],
            issuer=ISSUER,
            options={"verify_exp": False, "verify_iat": False},
        )
        self.assertEqual(claims["iss"], "openclaw-gateway")
        self.assertEqual(uuid.UUID(claims["jti"]).version, 4)
        self.assertEqual(claims["jti"], issued.jti)
        self.assertEqual(claims["iat"], int(NOW))
        self.assertEqual(claims["exp"], int(NOW) + 24 * 3600)

    def test_fractional_ttl(self) -> None:
        """
        SESSION_TTL_HOURS may be a fraction: half an hour is 1800 seconds.
        """
        issued = SessionAuthority(SECRET, 0.5 * 3600, clock=self.clock).issue()
        self.assertEqual(issued.expires_at - issued.issued_at, 1800)

    def test_fresh_jti_each_time(self) -> None:
        self.assertNotEqual(self.authority.issue().jti, self.authority.issue().jti)

    def test_banner(self) -> None:
        """
        The banner has the exact shape of the design document, with the full
        token.
        """
        issued = self.authority.issue()
        rule = "━" * 58
        self.assertEqual(
            issued.banner().splitlines(),
            [
                rule,
                "🔑  OPENCLAW GATEWAY — SESSION TOKEN",
                rule,
                f"   Token ID : {issued.jti}",
                "   Expires  : 2027-01-16T08:00:00Z",
                f"   Token    : {issued.token}",
                rule,
            ],
        )

    def test_token_not_in_repr(self) -> None:
        issued = self.authority.issue()
        self.assertNotIn(issued.token, repr(issued))


class VerifyTests(SynchronousTestCase):
    """
    Only the current token passes; everything else gets one of four
    reasons.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.authority = SessionAuthority(SECRET, 3600, clock=self.clock)
        self.issued = self.authority.issue()

    def claims(self, **overrides: object) -> dict[str, object]:
        claims: dict[str, object] = {
            "iss": ISSUER,
            "jti": self.issued.jti,
            "iat": int(NOW),
            "exp": int(NOW) + 3600,
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def assertRejected(self, token: object, reason: str) -> None:
        with self.assertRaises(TokenRejected) as caught:
            self.authority.verify(token)
        self.assertEqual(caught.exception.reason, reason)

    def test_current_token(self) -> None:
        self.assertEqual(self.authority.verify(self.issued.token), self.issued.jti)

    def test_whitespace_around(self) -> None:
        """
        The token file's newline, sent along by a dashboard that read the
        file, is no part of the token (recheck s44: it was an invalid
        token, counted toward the lockout).
        """
        self.assertEqual(self.authority.verify(self.issued.token + "\n"), self.issued.jti)
        self.assertEqual(self.authority.verify(" \t" + self.issued.token + "\r\n"), self.issued.jti)
        self.assertRejected("\n", "missing token")
        self.assertRejected(self.issued.token[:20] + " " + self.issued.token[20:], "invalid token")

    def test_missing(self) -> None:
        self.assertRejected(None, "missing token")
        self.assertRejected("", "missing token")

    def test_not_a_string(self) -> None:
        self.assertRejected(12, "invalid token")
        self.assertRejected({"token": self.issued.token}, "invalid token")

    def test_garbage(self) -> None:
        self.assertRejected("not-a-jwt", "invalid token")
        self.assertRejected("é" * 40, "invalid token")

    def test_wrong_secret(self) -> None:
        self.assertRejected(jwt.encode(self.claims(), OTHER_SECRET, algorithm="HS256"), "invalid token")

    def test_wrong_issuer(self) -> None:
        self.assertRejected(jwt.encode(self.claims(iss="someone-else"), SECRET, algorithm="HS256"), "invalid token")

    def test_no_issuer(self) -> None:
        self.assertRejected(jwt.encode(self.claims(iss=None), SECRET, algorithm="HS256"), "invalid token")

    def test_no_exp(self) -> None:
        self.assertRejected(jwt.encode(self.claims(exp=None), SECRET, algorithm="HS256"), "invalid token")

    def test_no_jti(self) -> None:
        self.assertRejected(jwt.encode(self.claims(jti=None), SECRET, algorithm="HS256"), "invalid token")

    def test_expired(self) -> None:
        """
        A token signed right but past its exp is refused as expired, and so
        is the current token once its time is up.
        """
        self.assertRejected(jwt.encode(self.claims(exp=int(NOW) - 1), SECRET, algorithm="HS256"), "token expired")
        self.clock.now = NOW + 3600
        self.assertRejected(self.issued.token, "token expired")

    def test_own_token_expired(self) -> None:
        """
        A single gateway's own token, expired, is refused saying there is
        no other until a restart (it renews nothing: "reconnect with the
        current token" sent the client back to the same one); a cluster's
        renews its own, so it says no more than the reason.
        """
        self.clock.now = NOW + 3600
        with self.assertRaises(TokenRejected) as caught:
            self.authority.verify(self.issued.token)
        self.assertEqual(str(caught.exception), f"token expired: {OWN_TOKEN_EXPIRED_HINT}")
        self.assertIn("restart the gateway", OWN_TOKEN_EXPIRED_HINT)
        self.assertLessEqual(len(str(caught.exception).encode()), 123)
        cluster = SessionAuthority(SECRET, 3600, clock=self.clock, shared=True)
        cluster.adopt(self.issued)
        with self.assertRaises(TokenRejected) as caught:
            cluster.verify(self.issued.token)
        self.assertEqual(str(caught.exception), "token expired")

    def test_other_jti(self) -> None:
        self.assertRejected(jwt.encode(self.claims(jti=str(uuid.uuid4())), SECRET, algorithm="HS256"), "token revoked")

    def test_newer_token_not_known_yet(self) -> None:
        """
        A token signed here, not expired, issued after the current one (a
        rotation elsewhere in the cluster, not applied here yet) is not
        known here yet, with what to do, rather than revoked; one issued
        before (or in the same second as) the current one, or without an
        iat, is revoked; once the newer one is current, the one it
        replaced is revoked.
        """
        newer = jwt.encode(self.claims(jti=str(uuid.uuid4()), iat=int(NOW) + 5), SECRET, algorithm="HS256")
        # A single gateway hears of no rotation elsewhere: revoked
        # (recheck s44: told to wait for "the cluster's latest rotation").
        self.assertRejected(newer, "token revoked")
        self.authority = SessionAuthority(SECRET, 3600, clock=self.clock, shared=True)
        self.authority.adopt(self.issued)
        with self.assertRaises(TokenRejected) as caught:
            self.authority.verify(newer)
        self.assertEqual(caught.exception.reason, NOT_KNOWN_YET)
        self.assertEqual(
            str(caught.exception),
            "token not known here yet: this instance has not heard of the cluster's latest rotation; retry in a moment",
        )
        older = jwt.encode(self.claims(jti=str(uuid.uuid4()), iat=int(NOW) - 5), SECRET, algorithm="HS256")
        self.assertRejected(older, "token revoked")
        with self.assertRaises(TokenRejected) as caught:
            self.authority.verify(older)
        self.assertEqual(str(caught.exception), "token revoked")
        self.assertRejected(jwt.encode(self.claims(jti=str(uuid.uuid4())), SECRET, algorithm="HS256"), "token revoked")
        no_iat = jwt.encode(self.claims(jti=str(uuid.uuid4()), iat=None), SECRET, algorithm="HS256")
        self.assertRejected(no_iat, "token revoked")
        # Expired, or signed with another secret: as before, whatever its iat.
        expired = self.claims(jti=str(uuid.uuid4()), iat=int(NOW) + 5, exp=int(NOW) - 1)
        self.assertRejected(jwt.encode(expired, SECRET, algorithm="HS256"), "token expired")
        foreign = self.claims(jti=str(uuid.uuid4()), iat=int(NOW) + 5)
        self.assertRejected(jwt.encode(foreign, OTHER_SECRET, algorithm="HS256"), "invalid token")
        self.clock.now = NOW + 5
        rotated = self.authority.issue()
        self.assertRejected(self.issued.token, "token revoked")
        self.assertEqual(self.authority.verify(rotated.token), rotated.jti)

    def test_alg_none(self) -> None:
        token = b64(b'{"alg":"none","typ":"JWT"}') + "." + b64(json.dumps(self.claims()).encode()) + "."
        self.assertRejected(token, "invalid token")

    def test_hs512(self) -> None:
        self.assertRejected(jwt.encode(self.claims(), SECRET * 2, algorithm="HS512"), "invalid token")

    def test_tampered_payload(self) -> None:
        header, _, signature = self.issued.token.split(".")
        forged = b64(json.dumps(self.claims(exp=int(NOW) + 10**6)).encode())
        self.assertRejected(f"{header}.{forged}.{signature}", "invalid token")

    def test_refusals_do_not_accumulate(self) -> None:
        """
        Each refusal is a fresh exception: re-raising a shared one would grow
        its traceback (and everything its frames hold) with every failure.
        """
        caught = []
        for token in ["garbage"] * 50 + [None] * 50:
            try:
                self.authority.verify(token)
            except TokenRejected as e:
                caught.append(e)
        self.assertEqual(len({id(e) for e in caught}), len(caught))
        depth, tb = 0, caught[-1].__traceback__
        while tb is not None:
            depth, tb = depth + 1, tb.tb_next
        self.assertLess(depth, 5)

    def test_rotation_revokes(self) -> None:
        old = self.issued
        new = self.authority.issue()
        self.assertRejected(old.token, "token revoked")
        self.assertEqual(self.authority.verify(new.token), new.jti)

    def test_restart_revokes(self) -> None:
        """
        A new process (a new authority, same secret) refuses the tokens of
        the old one.
        """
        restarted = SessionAuthority(SECRET, 3600, clock=self.clock)
        restarted.issue()
        with self.assertRaises(TokenRejected) as caught:
            restarted.verify(self.issued.token)
        self.assertEqual(caught.exception.reason, "token revoked")


class TokenFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.authority = SessionAuthority(SECRET, 3600, token_file=self.path)

    def test_written_0600(self) -> None:
        issued = self.authority.issue()
        self.assertEqual(self.path.read_text(), issued.token + "\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_follows_rotation(self) -> None:
        self.authority.issue()
        rotated = self.authority.issue()
        self.assertEqual(self.path.read_text(), rotated.token + "\n")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual([p.name for p in self.path.parent.iterdir()], [self.path.name])

    def test_cluster_file_of_another_secret_kept(self) -> None:
        """
        In a cluster the token file is the cluster's: an instance's first
        token does not replace one still in force that another JWT_SECRET
        signed (trial s25: an instance started with a wrong secret while
        Redis had lost the cluster's token replaced the shared file, and
        every operator using it was refused by the other instances).  One
        expired, or of this secret (a stale file), is replaced; a
        standalone gateway's file is its own.
        """
        clock = Clock()
        others = SessionAuthority(OTHER_SECRET, 3600, clock=clock).mint()
        self.path.write_text(others.token + "\n")
        ours = SessionAuthority(SECRET, 3600, clock=clock, token_file=self.path, shared=True)
        issued = ours.issue()
        self.assertEqual(self.path.read_text(), others.token + "\n")
        self.assertEqual(ours.current.jti, issued.jti)
        clock.now += 3601
        ours = SessionAuthority(SECRET, 3600, clock=clock, token_file=self.path, shared=True)
        issued = ours.issue()
        self.assertEqual(self.path.read_text(), issued.token + "\n")
        self.path.write_text(others.token + "\n")
        clock.now -= 3601
        standalone = SessionAuthority(SECRET, 3600, clock=clock, token_file=self.path)
        issued = standalone.issue()
        self.assertEqual(self.path.read_text(), issued.token + "\n")

    def test_failed_write_keeps_the_old_token(self) -> None:
        """
        If the token file cannot be written, the rotation does not happen:
        the old token keeps working instead of nobody holding a valid one.
        """
        directory = self.path.parent / "run"
        directory.mkdir()
        authority = SessionAuthority(SECRET, 3600, token_file=directory / "token")
        old = authority.issue()
        # Even root cannot write into a directory that is now a file.
        (directory / "token").unlink()
        directory.rmdir()
        directory.write_text("not a directory")
        self.authority = authority
        with self.assertRaises(TokenFileUnwritable) as caught:
            self.authority.issue()
        self.assertEqual(caught.exception.error, "Not a directory")
        self.assertEqual(self.authority.verify(old.token), old.jti)

    def test_discarded(self) -> None:
        self.authority.issue()
        self.authority.discard_token_file()
        self.assertFalse(self.path.exists())
        self.authority.discard_token_file()


class TokenWhitespaceTests(SynchronousTestCase):
    def test_only_ascii_whitespace(self) -> None:
        """
        Only what a file's newline and HTTP's optional whitespace are (SP,
        HTAB, CR, LF) is ignored around a token (review s45: str.strip()
        dropped U+0085, U+00A0, U+2028, U+3000 and more).
        """
        authority = SessionAuthority(SECRET, 3600, clock=Clock())
        issued = authority.issue()
        self.assertEqual(authority.verify(" \t" + issued.token + "\r\n"), issued.jti)
        for odd in ("\x1c", "\x85", "\u00a0", "\u2028", "\u3000"):
            with self.assertRaises(TokenRejected):
                authority.verify(odd + issued.token + odd)
