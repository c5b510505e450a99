"""
Threads of the gateway's own pools that never keep the process from
exiting: the interpreter joins every non-daemon thread at exit, so a pool
thread blocked on a disk or a database (or a pool whose stop never came:
a test, a bug) would hold the process for ever.  The work they do is
waited for where it must be (L{openclaw.writer.FileWriter.stopService},
the consumers' store's close), not by the interpreter.

One way of saying it, for every pool (Twisted's L{ThreadPool
<twisted.python.threadpool.ThreadPool>}, adbapi's
C{ConnectionPool.threadpool} included), before the pool starts::

    pool.threadFactory = DaemonThread

(C{threadFactory}: the public attribute L{ThreadPool} makes its threads
with.)
"""

from __future__ import annotations

import threading
from typing import Any


class DaemonThread(threading.Thread):
    """
    A thread that is a daemon thread from the first, for a pool's
    C{threadFactory} (L{twisted.python.threadpool.ThreadPool}'s).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True
