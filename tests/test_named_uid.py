"""
How the gateway's ownership errors name a user (L{named_uid}): the uid
and, when the user database has one, its name.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from openclaw.files import OwnerNotKept, named_uid, neither_user_nor_root
from openclaw.settings.permissions import untrusted_log_file


def _unknown_uid() -> int:
    """
    A uid the user database has no entry for.
    """
    uid = 4242
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


def _known_uid() -> tuple[int, str]:
    """
    This process's effective uid and its user's name.
    """
    euid = os.geteuid()
    try:
        return euid, pwd.getpwuid(euid).pw_name
    except KeyError:
        raise SkipTest(f"uid {euid} has no entry in the user database") from None


class NamedUidTests(SynchronousTestCase):
    def test_known_uid(self) -> None:
        euid, name = _known_uid()
        self.assertEqual(named_uid(euid), f"uid {euid} ({name})")

    def test_unknown_uid(self) -> None:
        uid = _unknown_uid()
        self.assertEqual(named_uid(uid), f"uid {uid}")

    def test_out_of_range(self) -> None:
        """
        A uid no user can have: the bare uid, not an error about the error.
        """
        self.assertEqual(named_uid(2**40), f"uid {2**40}")

    def test_owner_not_kept(self) -> None:
        euid, name = _known_uid()
        self.assertIn(f"the owner of /x, uid {euid} ({name}), gid 0", str(OwnerNotKept(Path("/x"), euid, 0)))

    def _owned_by_a_named_user(self, path: Path) -> tuple[int, str]:
        """
        Give C{path} (not followed) to a user with a name other than root
        (whose files every user takes): this user, or for root another.
        """
        euid, name = _known_uid()
        if euid != 0:
            return euid, name
        entry = next(entry for entry in pwd.getpwall() if entry.pw_uid != 0)
        os.lchown(path, entry.pw_uid, -1)
        return entry.pw_uid, entry.pw_name

    def test_log_file(self) -> None:
        log = Path(self.mktemp())
        log.write_text("")
        owner, owner_name = self._owned_by_a_named_user(log)
        gateway = _unknown_uid()
        self.assertIn(
            f"the log file belongs to uid {owner} ({owner_name}), neither the gateway's user, uid {gateway}, nor root",
            untrusted_log_file(log, euid=gateway) or "",
        )

    def test_log_file_through_a_link(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "openclaw.log").write_text("")
        link = directory / "link.log"
        link.symlink_to("openclaw.log")
        owner, owner_name = self._owned_by_a_named_user(link)
        gateway = _unknown_uid()
        self.assertIn(
            f"which belongs to uid {owner} ({owner_name}), neither the gateway's user, uid {gateway}, nor root, so "
            "that user chose where it points",
            untrusted_log_file(link, euid=gateway) or "",
        )


class NeitherUserNorRootTests(SynchronousTestCase):
    def test_root_named_once(self) -> None:
        """
        A gateway run as root names root once among the owners it trusts
        (operator trial s41: "neither the gateway's user, uid 0 (root), nor
        root").
        """
        self.assertEqual(neither_user_nor_root(0), "not root, the gateway's user")
        self.assertEqual(neither_user_nor_root(4242), f"neither the gateway's user, {named_uid(4242)}, nor root")
