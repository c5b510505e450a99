"""
OpenClaw: a gateway between a team's AI agents and the model providers they
pay for, steered live over an authenticated WebSocket control plane.
"""

__version__ = "0.1.0"
