"""The base of every command's options: ``--version``, examples, hidden options.

Every ``tigertunnel`` command (and ``twistd tigertunnel``) parses its
arguments with a subclass of :class:`ExampleOptions`, so that everywhere:

* ``--version`` prints :func:`version_line`: tigertunnel's version, the data
  path in use and the ML-KEM backend (usage's own ``--version`` prints
  Twisted's version);
* ``--help`` ends with :attr:`ExampleOptions.examples`, verbatim, one
  command line per line (Twisted re-wraps ``longdesc``, which would run
  them together);
* options named in :attr:`ExampleOptions.hidden` (set by tigertunnel for
  its own processes) are accepted but left out of ``--help``.
"""

import platform
import sys
from typing import List, NoReturn, Optional, Tuple

from twisted.python import usage

import tigertunnel


def version_line() -> str:
    """One line: the version, the data path, the ML-KEM backend, Python and Twisted."""
    import twisted

    from tigertunnel.crypto.kem import backend_description
    from tigertunnel.wire.implementation import ACTIVE, REASON

    datapath = f"{ACTIVE.name} ({REASON})" if REASON else ACTIVE.name
    return (f"tigertunnel {tigertunnel.__version__}; data path: {datapath}; "
            f"ML-KEM: {backend_description()}; Python {platform.python_version()}, "
            f"Twisted {twisted.__version__}")


class ExampleOptions(usage.Options):
    """Options whose ``--help`` ends with :attr:`examples` and hides :attr:`hidden`."""

    #: Printed verbatim at the end of ``--help``.
    examples = ""
    #: Long options (without ``--``) accepted but not shown by ``--help``.
    hidden: Tuple[str, ...] = ()

    def opt_version(self) -> NoReturn:
        """Print tigertunnel's version, data path and ML-KEM backend, and exit."""
        print(version_line())
        sys.exit(0)

    def getUsage(self, width: Optional[int] = None) -> str:
        shown: List[str] = self.longOpt
        if self.hidden and not hasattr(self, "subOptions"):
            self.longOpt = [o for o in shown if o.rstrip("=") not in self.hidden]
        try:
            text: str = super().getUsage(width)
        finally:
            self.longOpt = shown
        if self.examples and not hasattr(self, "subOptions"):
            text = text.rstrip("\n") + "\n\n" + self.examples.strip("\n") + "\n"
        return text
