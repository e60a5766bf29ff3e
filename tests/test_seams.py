"""The order of the modules inside net/ and its seams (:mod:`tigertunnel.interfaces`), read from the source.

The direction between layers, and that the sans-IO packages never import
``twisted.internet``, are checked in ``tests/test_layers.py``.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

from twisted.trial.unittest import SynchronousTestCase

PACKAGE = Path(__file__).resolve().parent.parent / "tigertunnel"

#: The order of the modules of net/: each may import only modules of a
#: lower rank (interfaces.py imports nothing of net/).
NET_RANKS: Dict[str, int] = {
    "admission": 0, "backoff": 0, "heartbeat": 0, "outage": 0, "outcome": 0, "states": 0,
    "twisted_private": 0, "pairstatus": 0,
    "reactor": 1, "sockets": 1, "streams": 1,
    "frame_protocol": 2, "listeners": 2,
    "tunnel_protocol": 3,
    "pool_client": 4, "pool_server": 4, "retire": 4,
    "pool": 5, "pairmux": 5,
    "multiplexer": 6,
}


def imports(path: Path) -> Set[str]:
    """Every module ``path`` imports, at any depth of its code."""
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def mentions_type_checking(path: Path) -> bool:
    """Whether ``path`` uses ``typing.TYPE_CHECKING``."""
    return any(isinstance(node, ast.Name) and node.id == "TYPE_CHECKING"
               for node in ast.walk(ast.parse(path.read_text(), str(path))))


class NetImportTests(SynchronousTestCase):
    """Inside net/, imports point one way and no sibling is imported for typing only."""

    def test_every_module_ranked(self) -> None:
        """Every module of net/ has a rank (a new module must be placed)."""
        modules = {p.stem for p in (PACKAGE / "net").glob("*.py") if p.stem != "__init__"}
        self.assertEqual(modules, set(NET_RANKS))

    def test_no_type_checking_imports(self) -> None:
        """No module of net/, nor interfaces.py, hides an import behind TYPE_CHECKING."""
        paths = sorted((PACKAGE / "net").glob("*.py")) + [PACKAGE / "interfaces.py"]
        self.assertEqual([p.name for p in paths if mentions_type_checking(p)], [])

    def test_imports_point_down(self) -> None:
        """A net/ module imports only net/ modules of a lower rank."""
        wrong: List[str] = []
        for name, rank in NET_RANKS.items():
            for module in imports(PACKAGE / "net" / f"{name}.py"):
                parts = module.split(".")
                if parts[:2] == ["tigertunnel", "net"] and len(parts) > 2:
                    other = parts[2]
                    if other in NET_RANKS and NET_RANKS[other] >= rank:
                        wrong.append(f"{name} imports {other}")
        self.assertEqual(wrong, [])

    def test_interfaces_import_nothing_of_net(self) -> None:
        """interfaces.py, the seams below net/, imports no module of net/ (the counters it names are in tigertunnel.stats)."""
        net = {m for m in imports(PACKAGE / "interfaces.py") if m.startswith("tigertunnel.net")}
        self.assertEqual(net, set())


#: What the operations layer's reload, figures and metrics may use of a
#: multiplexer: its operations and its public settings, no internals.
MUX_OPERATIONS = {"snapshot", "retire_outdated", "close_retired", "keyring",
                  "handshake_timeout", "stopping", "pair_label", "role", "config"}
OPS_USERS = ("reload.py", "figures.py", "metrics.py")


class OpsUsesOperationsTests(SynchronousTestCase):
    """ops/ reload, figures and metrics use the multiplexer's operations only."""

    def test_no_role_switch(self) -> None:
        """No isinstance() on a multiplexer class: each role answers for itself."""
        found = []
        for name in OPS_USERS:
            path = PACKAGE / "ops" / name
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == "isinstance" and len(node.args) == 2
                        and "Multiplexer" in ast.unparse(node.args[1])):
                    found.append(f"{name}:{node.lineno}")
        self.assertEqual(found, [])

    def test_no_internals(self) -> None:
        """A multiplexer (``mux``) is asked only for its operations and settings."""
        found = []
        for name in OPS_USERS:
            path = PACKAGE / "ops" / name
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id == "mux" and node.attr not in MUX_OPERATIONS):
                    found.append(f"{name}:{node.lineno}: mux.{node.attr}")
        self.assertEqual(found, [])
