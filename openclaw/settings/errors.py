"""
The errors of reading settings: what a refused start-up says.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """
    A configuration value is unusable; the message is meant for the operator
    and says which variable, which value, and what would be accepted.
    """


class InvalidValue(ValueError):
    """
    A setting's value is invalid, for the reason given (shown before the
    setting's hint).
    """


class HostTrouble(ConfigError):
    """
    A file or directory the gateway makes at start-up (a lock file,
    C{STATE_DIR}) cannot be made for the host's trouble (a full disk, a
    quota, an I/O error: L{openclaw.tap.HOST_ERRNOS}; a read-only file
    system), not its configuration: C{twistd openclaw} ends with one line
    (C{openclaw: } and C{str()}) and exit status 1, which a unit manager
    restarts (the shipped unit's C{RestartPreventExitStatus=2} is for
    configuration errors only), as it does for a first token that cannot
    be written.  A L{ConfigError} for callers that only refuse.
    """
