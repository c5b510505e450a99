"""
L{openclaw.spelling.meant}: the name a mistyped one meant, case aside.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from openclaw.spelling import meant


class MeantTests(SynchronousTestCase):
    def test_meant(self) -> None:
        names = ["burst", "day3", "t01", "t02", "team0", "GEMINI_MODEL"]
        for word, expected in (
            ("t01", "t01"),
            ("T01", "t01"),
            ("BURST", "burst"),
            ("teamm0", "team0"),
            ("gemini_modle", "GEMINI_MODEL"),
            ("nobody", None),
            ("", None),
        ):
            self.assertEqual(meant(word, names), expected, word)

    def test_equal_but_for_case_comes_first(self) -> None:
        """
        A name equal but for case is preferred to a closer-spelt one, and
        among several equal but for case the first sorted is given.
        """
        self.assertEqual(meant("Ab", ["ab", "Ab1"]), "ab")
        self.assertEqual(meant("AB", ["ab", "Ab"]), "Ab")
        self.assertEqual(meant("team1", ["team01"], cutoff=0.95), None)
