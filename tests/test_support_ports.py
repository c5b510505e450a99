"""
The tests' own free-port picker: the ports it hands out never repeat
within one test process, so a gateway's control and API ports (picked one
after the other, before either is bound) are always two different ports.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from tests.redis_server import free_port


class FreePortTests(SynchronousTestCase):
    def test_never_the_same_port_twice(self) -> None:
        # 1,500 picks from the ~12,000 candidates: a random pick without
        # memory repeats with near certainty (birthday bound), this never.
        ports = [free_port() for _ in range(1500)]
        self.assertEqual(len(set(ports)), len(ports))
