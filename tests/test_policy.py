"""One of each policy: a shared constant is defined once and imported elsewhere."""

import ast
import os
from typing import Dict, List

from twisted.trial.unittest import SynchronousTestCase

import tigertunnel

PACKAGE = os.path.dirname(os.path.abspath(tigertunnel.__file__))


def _definitions() -> Dict[str, List[str]]:
    """``{name: [module path, ...]}`` of every module-level constant
    assigned a value (``NAME = ...``) in the package."""
    found: Dict[str, List[str]] = {}
    for root, _dirs, files in os.walk(PACKAGE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read(), path)
            for node in tree.body:
                targets = (node.targets if isinstance(node, ast.Assign)
                           else [node.target] if isinstance(node, ast.AnnAssign) else [])
                for target in targets:
                    if isinstance(target, ast.Name):
                        found.setdefault(target.id.lstrip("_"), []).append(
                            os.path.relpath(path, PACKAGE))
    return found


class SharedConstantTests(SynchronousTestCase):
    """Policy values that must agree everywhere are written in one module."""

    def test_defined_once(self) -> None:
        """The u64 bound and the default shutdown timeout each have one definition."""
        found = _definitions()
        for name, home in (("MAX_U64", "crypto/layout.py"),
                           ("DEFAULT_SHUTDOWN_TIMEOUT", "config/model.py")):
            self.assertEqual(found.get(name), [home], name)

    def test_value_of_u64_bound(self) -> None:
        """Every u64 range check (the wire layer, the key ring) uses the same bound."""
        from tigertunnel.crypto import layout
        from tigertunnel.keys import ring
        from tigertunnel.wire import codec, handshake, muxframes, replaywindow

        self.assertEqual(layout.MAX_U64, 2 ** 64 - 1)
        for module in (codec, handshake, muxframes, replaywindow, ring):
            self.assertIs(getattr(module, "MAX_U64"), layout.MAX_U64, module.__name__)
