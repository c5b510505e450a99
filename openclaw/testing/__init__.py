"""
The stand-in upstream, shipped with the package so operators can run it by hand
(C{python -m openclaw.testing.upstream --port 8001}) as well as from tests.
"""
