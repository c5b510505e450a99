"""
The active provider and model, kept across restarts in C{STATE_DIR}.

Only the route is kept: tokens are never written here.  A missing file means
the configured defaults; a corrupt or unreadable one is logged and ignored,
never fatal, because an operator must always be able to start the gateway.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from twisted.logger import Logger

from openclaw.files import write_atomically
from openclaw.routing import Route

STATE_FILE = "openclaw-state.json"


class RouteStore:
    """
    Reads and writes the active route as a small JSON file.
    """

    _log = Logger(namespace="openclaw.state")

    def __init__(self, directory: Path, provider_ids: Iterable[str]) -> None:
        self.path = directory / STATE_FILE
        self._provider_ids = frozenset(provider_ids)

    def load(self) -> Route | None:
        """
        The route saved by an earlier run, or L{None} when there is none to
        be trusted.
        """
        try:
            document = json.loads(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            self._log.warn("ignoring unreadable state file {path}: {error}", path=str(self.path), error=str(e))
            return None
        provider, model = (
            (document.get("provider"), document.get("model")) if isinstance(document, dict) else (None, None)
        )
        if (
            not isinstance(provider, str)
            or provider not in self._provider_ids
            or not isinstance(model, str)
            or not model.strip()
        ):
            self._log.warn(
                "ignoring state file {path}: it does not name a known provider and a model", path=str(self.path)
            )
            return None
        return Route(provider, model)

    def save(self, route: Route) -> None:
        """
        Replace the file atomically (temporary file, fsync, rename), so a
        crash leaves the old route or the new one, never half of either.
        A failure is logged: the switch itself has happened.
        """
        try:
            write_atomically(self.path, json.dumps({"provider": route.provider_id, "model": route.model}))
        except OSError as e:
            self._log.error(
                "could not save the active provider to {path}: {error}; it will not survive a restart",
                path=str(self.path),
                error=str(e),
            )
