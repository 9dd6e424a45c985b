"""The package's version: major 1 for the API acme.orders.v1 (docs/client.md#versions).

The minor version grows with what the package adds (RPCs, fields, client
features), the patch with fixes; a v2 of the API would be a 2.x package.
hatchling reads `__version__` from here (generated/pyproject.toml).
"""

__version__ = "1.1.0"
API_PACKAGE = "acme.orders.v1"
