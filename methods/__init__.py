"""One module per method; importing this package registers them all.

Imports are explicit: a method module that fails to import is an error, never skipped.
"""
from . import vnet  # noqa: F401
from . import uamt  # noqa: F401
from . import sassnet  # noqa: F401
from . import bcp  # noqa: F401
from . import omf  # noqa: F401
from . import dtc  # noqa: F401
from . import ssnet  # noqa: F401
