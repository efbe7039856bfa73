"""One module per method; importing this package registers them all.

Imports are explicit: a method module that fails to import is an error, never skipped.
"""
from . import vnet  # noqa: F401
