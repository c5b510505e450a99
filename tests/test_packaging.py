"""
What an install (C{pip install .}, not only an editable one) holds:
setup.cfg lists its packages one by one, so a package added under
C{openclaw/} (C{openclaw/ctl/} when C{ctl.py} was split) and not listed
there would be left out of it, and C{openclawctl} would fail on import.
"""

from __future__ import annotations

import configparser
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

import openclaw
from openclaw import ctl

ROOT = Path(openclaw.__file__).parent.parent


class PackagesTests(SynchronousTestCase):
    """
    setup.cfg's C{packages} and the packages in the source tree.
    """

    def test_every_package_listed(self) -> None:
        """
        Every directory under C{openclaw/} with an C{__init__.py} is in
        setup.cfg's C{packages}.
        """
        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        listed = set(config["options"]["packages"].split())
        found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "openclaw").rglob("__init__.py")}
        self.assertEqual(found - listed, set())

    def test_console_script_entry_point(self) -> None:
        """
        The console script C{openclawctl = openclaw.ctl:main} names a
        function of the package C{openclaw.ctl}.
        """
        config = configparser.ConfigParser()
        config.read(ROOT / "setup.cfg")
        scripts = dict(
            line.split(" = ", 1) for line in config["options.entry_points"]["console_scripts"].split("\n") if line
        )
        module, _, name = scripts["openclawctl"].partition(":")
        self.assertEqual(module, ctl.__name__)
        self.assertTrue(callable(getattr(ctl, name)))
