"""
Test doubles that ship with the package, so operators can run them by hand
(C{python -m openclaw.testing.upstream --port 8001}) as well as from tests.
"""
