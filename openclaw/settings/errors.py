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
