"""What setuptools makes of the packaging metadata, on a real metadata build.

``setup.py egg_info`` (no compiler, no network) writes the PKG-INFO and the
file list a wheel or sdist of this checkout is made from.
"""

import os
import sys

from twisted.trial.unittest import TestCase

from tests.integration import procs
from tests.test_packaging import ROOT


class EggInfoTests(TestCase):
    """The built metadata declares Python 3.11+, the licence file, the classifiers and py.typed."""

    timeout = 120

    async def test_built_metadata(self) -> None:
        """PKG-INFO has Requires-Python >=3.11, License-File LICENSE and the Python 3.11 classifier; the file list has LICENSE and tigertunnel/py.typed."""
        out = os.path.abspath(self.mktemp())
        os.makedirs(out)
        # setup.py reads setup.cfg from its working directory.
        result = await procs.run([sys.executable, "setup.py", "-q", "egg_info",
                                  "--egg-base", out], timeout=90, cwd=ROOT)
        self.assertEqual(result.status, 0, result.describe())
        info = os.path.join(out, "tigertunnel.egg-info")
        pkg_info = procs.read_text(os.path.join(info, "PKG-INFO"))
        for line in ("Requires-Python: >=3.11", "License-File: LICENSE",
                     "Classifier: Programming Language :: Python :: 3.11",
                     "Classifier: Typing :: Typed"):
            self.assertIn(line + "\n", pkg_info)
        sources = procs.read_text(os.path.join(info, "SOURCES.txt")).splitlines()
        self.assertIn("LICENSE", sources)
        self.assertIn("tigertunnel/py.typed", sources)
        requires = procs.read_text(os.path.join(info, "requires.txt")).splitlines()
        self.assertIn("pyaegis<0.4,>=0.3.1", requires)
