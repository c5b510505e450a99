"""
C{openclawctl}: the gateway's command-line client.
"""

import sys


def main() -> None:
    sys.exit("openclawctl: not implemented yet")
