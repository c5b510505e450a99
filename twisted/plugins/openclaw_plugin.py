"""
The C{twistd openclaw} plugin.  It names the module that builds the service
and imports nothing heavy, so Twisted's plugin scan stays fast and cannot be
broken by this package.
"""

from twisted.application.service import ServiceMaker

openclaw = ServiceMaker(
    "OpenClaw gateway",
    "openclaw.tap",
    "Authenticated control plane and provider switch for Kimi and Gemini",
    "openclaw",
)
