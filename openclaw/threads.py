"""
Threads of the gateway's own pools that never keep the process from
exiting: the interpreter joins every non-daemon thread at exit, so a pool
thread blocked on a disk or a database (or a pool whose stop never came:
a test, a bug) would hold the process for ever.  The work they do is
waited for where it must be (L{openclaw.writer.FileWriter.stopService},
the consumers' store's close), not by the interpreter.
"""

from __future__ import annotations

import threading
from typing import Any

from twisted.python.threadpool import ThreadPool


class DaemonThread(threading.Thread):
    """
    A thread that is a daemon thread from the first, for a pool's
    C{threadFactory}.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.daemon = True


class DaemonThreadPool(ThreadPool):
    """
    Twisted's L{ThreadPool}, its threads L{DaemonThread}s (its
    C{threadFactory}).
    """

    threadFactory = DaemonThread
