"""Which data path this test run uses, checked against what the run asked for.

tox's default environment sets ``TIGERTUNNEL_REQUIRE_COMPILED=1``: there the
compiled extension must have been built and be in use, so a build that
silently fell back to pure Python fails CI instead of passing on the
fallback. The ``pure`` environment sets ``TIGERTUNNEL_PURE=1``: there every
module must use its pure-Python classes.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.crypto import aead
from tigertunnel.wire import compiled, datapath, frames


def _wanted(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


class BuildModeTests(SynchronousTestCase):
    """The data path in use is the one the test environment asked for."""

    def test_compiled_when_required(self) -> None:
        """With TIGERTUNNEL_REQUIRE_COMPILED set, the extension is loaded and the frame classes come from it."""
        if not _wanted("TIGERTUNNEL_REQUIRE_COMPILED"):
            raise self.skipTest("TIGERTUNNEL_REQUIRE_COMPILED is not set")
        self.assertIsNotNone(compiled.hotpath, compiled.reason)
        for cls in (frames.FrameParser, aead.FrameSealer, aead.FrameOpener,
                    datapath.FrameEncoder, datapath.MuxReceiver):
            self.assertEqual(cls.__module__, "tigertunnel.wire._hotpath", cls)

    def test_pure_when_forced(self) -> None:
        """With TIGERTUNNEL_PURE set, no class comes from the extension."""
        if not _wanted(compiled.PURE_VARIABLE):
            raise self.skipTest(f"{compiled.PURE_VARIABLE} is not set")
        self.assertIsNone(compiled.hotpath)
        for cls in (frames.FrameParser, aead.FrameSealer, aead.FrameOpener,
                    datapath.FrameEncoder, datapath.MuxReceiver):
            self.assertNotEqual(cls.__module__, "tigertunnel.wire._hotpath", cls)
