"""Shared test fixtures: reference vectors, the recorded TigerBeetle traces, and
the two implementations of the data path."""

import json
import os
from typing import TYPE_CHECKING, Any, Optional, Tuple, Type

from twisted.trial.unittest import SynchronousTestCase

from tigertunnel.tools.traces import TraceFrame, load_trace  # noqa: F401 (re-export)
from tigertunnel.wire.compiled import reason as _compiled_reason
from tigertunnel.wire import codec
from tigertunnel.wire.datapath import ACTIVE, COMPILED, PURE, Implementation

HERE = os.path.dirname(os.path.abspath(__file__))
VECTORS = os.path.join(HERE, "vectors")


def load_vectors(name: str) -> Any:
    """Return the parsed JSON of ``tests/vectors/<name>.json``.

    These files are byte-identical copies of ``shared/vectors`` (made by
    running the Zig reference implementation).
    """
    with open(os.path.join(VECTORS, name + ".json")) as f:
        return json.load(f)


def unhex(s: str) -> bytes:
    """Decode a lowercase hex string from a vector file."""
    return bytes.fromhex(s)


#: Why the compiled variants of the tests are skipped, or ``None``.
COMPILED_SKIP: Optional[str] = None if COMPILED is not None else (
    "compiled data path not in use: "
    + (_compiled_reason or "the installed pyaegis exposes no libaegis functions"))

if TYPE_CHECKING:
    ImplementationMixin = SynchronousTestCase
else:
    ImplementationMixin = object


def on_both(mixin: type) -> Tuple[type, type]:
    """Return two test cases made of ``mixin``'s tests: pure Python, then compiled.

    ``mixin`` subclasses :data:`ImplementationMixin` and reaches the classes
    under test through ``self.impl`` (an :class:`Implementation`). Bind the
    results to the module-level names ``Pure<mixin>`` and ``Compiled<mixin>``
    (trial's workers find test cases by module attribute); the compiled one
    is skipped (with the reason) where the extension is not in use.
    """
    made = []
    for prefix, impl, skip in (("Pure", PURE, None),
                               ("Compiled", COMPILED or PURE, COMPILED_SKIP)):
        name = prefix + mixin.__name__
        doc = f"{(mixin.__doc__ or '').strip()} ({impl.name if not skip else 'compiled'} data path)"
        made.append(type(name, (mixin, SynchronousTestCase), {
            "impl": impl, "skip": skip, "__doc__": doc,
            "__module__": mixin.__module__, "__qualname__": name}))
    return made[0], made[1]


def on_other_implementation(case: Type[SynchronousTestCase]) -> type:
    """Return ``case`` run with the codec's data-path classes of the other implementation.

    ``case`` tests :class:`~tigertunnel.wire.codec.PoolCodec`, which uses
    the implementation selected at import; the returned test case patches
    in the other one (pure Python if the compiled one is selected, and the
    reverse), so that the two together cover both. It is skipped where the
    compiled one is not in use.
    """
    other = PURE if ACTIVE is not PURE else COMPILED
    # Bind the result to this name in the test module: trial's workers (-j)
    # find test cases by module attribute.
    name = "Other" + case.__name__

    def setUp(self: SynchronousTestCase) -> None:
        case.setUp(self)
        if other is not None:
            self.patch(codec, "IMPLEMENTATION", other)

    doc = f"{(case.__doc__ or '').strip()} ({other.name if other else 'compiled'} data path)"
    return type(name, (case,), {
        "setUp": setUp, "skip": None if other is not None else COMPILED_SKIP,
        "__doc__": doc, "__module__": case.__module__, "__qualname__": name})


__all__ = ["load_vectors", "unhex", "load_trace", "TraceFrame", "COMPILED_SKIP",
           "ImplementationMixin", "on_both", "on_other_implementation", "Implementation"]
