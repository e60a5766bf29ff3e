"""The one place that picks the data path: the pure-Python classes or their compiled twins.

The data path has five classes: :class:`~tigertunnel.wire.frames.FrameParser`,
:class:`~tigertunnel.crypto.aead.FrameSealer`,
:class:`~tigertunnel.crypto.aead.FrameOpener`,
:class:`~tigertunnel.wire.datapath.FrameEncoder` and
:class:`~tigertunnel.wire.datapath.MuxReceiver`. Those names are always the
pure-Python classes, the reference. The optional C extension
:mod:`tigertunnel.wire._hotpath` has a twin of each, with the same API and
results byte for byte. This module chooses, once at import, which set the
program uses: :data:`ACTIVE` (:data:`PURE` or :data:`COMPILED`), and says
why in :data:`REASON`. Code that builds a data-path object takes its class
from an :class:`Implementation`, typed by the protocols below, so mypy
checks every call whichever twin runs. A compiled encoder needs a
compiled sealer and a compiled receiver a compiled opener: use the classes
of one :class:`Implementation` together.

The compiled set is used unless

* ``TIGERTUNNEL_PURE=1`` is set (:data:`PURE_VARIABLE`);
* the extension is not built;
* the extension was compiled with other wire constants than the Python
  modules have (each constant it exports is compared, :func:`check_extension`),
  or from another ``_hotpath.c`` than the one beside it (its ``BUILD_HASH``,
  the SHA-256 of its source, when that source is present);
* the installed pyaegis cannot lend it libaegis
  (:func:`tigertunnel.crypto.libaegis.aegis_addresses`: the version range
  ``setup.cfg`` pins, the two functions and their C signature).

In the last two cases the extension is there but refused: one warning says
why. With ``TIGERTUNNEL_REQUIRE_COMPILED=1`` (:data:`REQUIRE_VARIABLE`, set
by tox's compiled environments) any of these but the first makes importing
this module raise :class:`CompiledPathError` instead.
"""

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Tuple

from twisted.logger import Logger

from tigertunnel.crypto import aead, layout, libaegis
from tigertunnel.crypto.aead import Opener, Sealer
from tigertunnel.wire import datapath, frames, muxframes
from tigertunnel.wire.datapath import Item
from tigertunnel.wire.muxframes import FrameType

__all__ = ["PURE_VARIABLE", "REQUIRE_VARIABLE", "Parsing", "Encoding", "Receiving",
           "Implementation", "CompiledPathError", "Choice", "wire_constants",
           "Extension", "check_extension", "choose", "PURE", "COMPILED", "ACTIVE", "REASON",
           "EXTENSION"]

log = Logger()

#: The environment variable that forces the pure-Python classes.
PURE_VARIABLE = "TIGERTUNNEL_PURE"
#: The environment variable that makes an unusable extension an error.
REQUIRE_VARIABLE = "TIGERTUNNEL_REQUIRE_COMPILED"

#: The extension's source, beside this module in a checkout.
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_hotpath.c")


class Parsing(Protocol):
    """A TB frame parser (:class:`~tigertunnel.wire.frames.FrameParser`)."""

    def feed(self, data: bytes) -> List[bytes]:
        """Every TB frame ``data`` completed."""


class Encoding(Protocol):
    """A session's encoder (:class:`~tigertunnel.wire.datapath.FrameEncoder`)."""

    @property
    def last_frames(self) -> int:
        """How many TB frames the last :meth:`encode` call completed."""

    def encode(self, data: bytes) -> "bytes | bytearray":
        """The wire bytes of every TB frame ``data`` completed."""


class Receiving(Protocol):
    """A pool connection's receiver (:class:`~tigertunnel.wire.datapath.MuxReceiver`)."""

    def feed(self, data: bytes) -> List[Item]:
        """``(stream_id, frame_type, payload)`` of every mux frame ``data`` completed."""


class ParserClass(Protocol):
    """The constructor of a :class:`Parsing`."""

    def __call__(self, max_size: int = ...) -> Parsing:
        """A parser of frames up to ``max_size`` bytes."""


class SealerClass(Protocol):
    """The constructor of a :class:`~tigertunnel.crypto.aead.Sealer`."""

    def __call__(self, key: bytes, base_nonce: bytes, counter: int = ...) -> Sealer:
        """A sealer for one direction's key and base nonce."""


class OpenerClass(Protocol):
    """The constructor of an :class:`~tigertunnel.crypto.aead.Opener`."""

    def __call__(self, key: bytes, base_nonce: bytes, cluster_id: int = ...,
                 counter: int = ...) -> Opener:
        """An opener for one direction's key and base nonce."""


class EncoderClass(Protocol):
    """The constructor of an :class:`Encoding`."""

    def __call__(self, stream_id: int, sealer: Optional[Sealer], check: bool,
                 cluster_id: Optional[int] = ...,
                 watch: "Optional[Callable[[bytes], object]]" = ...) -> Encoding:
        """An encoder for ``stream_id`` sealing with ``sealer`` (of the same set)."""


class ReceiverClass(Protocol):
    """The constructor of a :class:`Receiving`."""

    def __call__(self, opener: Optional[Opener], extended: bool = ...) -> Receiving:
        """A receiver opening with ``opener`` (of the same set)."""


@dataclass(frozen=True)
class Implementation:
    """A matching set of data-path classes: all compiled or all pure Python."""

    name: str
    FrameParser: ParserClass
    FrameSealer: SealerClass
    FrameOpener: OpenerClass
    FrameEncoder: EncoderClass
    MuxReceiver: ReceiverClass


class Extension(Protocol):
    """What this module uses of the extension :mod:`tigertunnel.wire._hotpath`
    (its ``.pyi`` is checked against it, so mypy sees a twin whose API drifts)."""

    @property
    def FrameParser(self) -> ParserClass:
        """The compiled parser."""

    @property
    def FrameSealer(self) -> SealerClass:
        """The compiled sealer."""

    @property
    def FrameOpener(self) -> OpenerClass:
        """The compiled opener."""

    @property
    def FrameEncoder(self) -> EncoderClass:
        """The compiled encoder."""

    @property
    def MuxReceiver(self) -> ReceiverClass:
        """The compiled receiver."""

    def bind_aegis(self, encrypt_address: int, decrypt_address: int) -> None:
        """Hand it libaegis' encrypt and decrypt functions."""


class CompiledPathError(ImportError):
    """``TIGERTUNNEL_REQUIRE_COMPILED`` is set and the compiled data path cannot be used."""


@dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided.

    :ivar implementation: the set to use.
    :ivar reason: why it is not the compiled set (empty when it is).
    :ivar refused: the extension is built but was refused (a mismatch, or
        pyaegis cannot lend it libaegis): worth a warning.
    :ivar extension: the extension module when the compiled set is chosen.
    """

    implementation: Implementation
    reason: str
    refused: bool
    extension: Optional[Extension] = None


#: The pure-Python classes: the reference.
PURE = Implementation("python", frames.FrameParser, aead.FrameSealer, aead.FrameOpener,
                      datapath.FrameEncoder, datapath.MuxReceiver)


def wire_constants() -> Dict[str, object]:
    """Every wire constant the extension exports, with the Python modules' value."""
    return {
        "HEADER_SIZE": layout.HEADER_SIZE,
        "MIN_FRAME_SIZE": layout.MIN_FRAME_SIZE,
        "MAX_FRAME_SIZE": layout.MAX_FRAME_SIZE,
        "SIZE_OFFSET": layout.SIZE_OFFSET,
        "SIZE_END": layout.SIZE_END,
        "MUX_HEADER_SIZE": layout.MUX_HEADER_SIZE,
        "TAG_SIZE": aead.TAG_SIZE,
        "KEY_SIZE": aead.KEY_SIZE,
        "NONCE_SIZE": aead.NONCE_SIZE,
        "CLEAR_SIZE_OFFSET": aead.CLEAR_SIZE_OFFSET,
        "CIPHERTEXT_OFFSET": aead.CIPHERTEXT_OFFSET,
        "CLOSE_PAYLOAD_SIZE": muxframes.CLOSE_PAYLOAD_SIZE,
        "CONTROL_PAYLOAD_SIZE": muxframes.CONTROL_PAYLOAD_SIZE,
        "TYPE_DATA": int(FrameType.DATA),
        "TYPE_OPEN": int(FrameType.OPEN),
        "TYPE_CLOSE": int(FrameType.CLOSE),
        "REFERENCE_MAX_TYPE": int(FrameType.CLOSE),
        "MAX_TYPE": max(int(t) for t in FrameType),
        "MAGIC": muxframes.MAGIC,
    }


def source_hash(path: str = SOURCE) -> Optional[str]:
    """The SHA-256 (hex) of the extension's source at ``path``, ``None`` if absent."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except FileNotFoundError:
        return None


def check_extension(module: Extension, source: Optional[str]) -> None:
    """Check that ``module`` was built from this source with these wire constants.

    :param source: the SHA-256 of the source beside the package, or
        ``None`` (an installed package ships no source).
    :raises ValueError: a constant differs or is missing, or the build's
        hash is not ``source``; the message names the first difference.
    """
    missing = object()
    for name, value in wire_constants().items():
        got = getattr(module, name, missing)
        if got is missing:
            raise ValueError(f"it exports no {name}")
        if got != value:
            raise ValueError(f"its {name} is {got!r}, the Python modules' is {value!r}")
    built = getattr(module, "BUILD_HASH", "")
    if not isinstance(built, str) or not built:
        raise ValueError("it has no BUILD_HASH")
    if source is not None and built != source:
        raise ValueError(f"it was built from another _hotpath.c (BUILD_HASH {built[:12]}, "
                         f"source {source[:12]}; rebuild it)")


def _import_extension() -> Extension:
    from tigertunnel.wire import _hotpath
    return _hotpath


def _wanted(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "") not in ("", "0")


def choose(environ: Mapping[str, str],
           load: Callable[[], Extension] = _import_extension,
           addresses: Callable[[], Tuple[int, int]] = libaegis.aegis_addresses,
           source: Callable[[], Optional[str]] = source_hash) -> Choice:
    """Pick the data path for ``environ`` (see the module docstring).

    :param load: imports the extension (tests pass a fake).
    :param addresses: the libaegis addresses for the extension's
        ``bind_aegis`` (:func:`tigertunnel.crypto.libaegis.aegis_addresses`).
    :param source: the SHA-256 of the extension's source, or ``None``.
    :raises CompiledPathError: :data:`REQUIRE_VARIABLE` is set and the
        compiled set cannot be used (and :data:`PURE_VARIABLE` is not set).
    """
    if _wanted(environ, PURE_VARIABLE):
        return Choice(PURE, f"{PURE_VARIABLE} is set", False)
    refused = True
    try:
        module = load()
    except ImportError as e:
        reason, refused = f"the extension is not built ({e})", False
    else:
        try:
            check_extension(module, source())
            encrypt, decrypt = addresses()
        except ValueError as e:
            reason = f"the extension does not match the Python modules: {e}"
        except libaegis.LibaegisError as e:
            reason = f"the extension cannot use the installed pyaegis: {e}"
        else:
            module.bind_aegis(encrypt, decrypt)
            return Choice(Implementation("c", module.FrameParser, module.FrameSealer,
                                         module.FrameOpener, module.FrameEncoder,
                                         module.MuxReceiver), "", False, module)
    if _wanted(environ, REQUIRE_VARIABLE):
        raise CompiledPathError(f"{REQUIRE_VARIABLE} is set but the compiled data path "
                                f"cannot be used: {reason}")
    return Choice(PURE, reason, refused)


_choice = choose(os.environ)
if _choice.refused:
    log.warn("Using the pure-Python data path: {reason}", reason=_choice.reason)

#: The set the program uses.
ACTIVE: Implementation = _choice.implementation
#: Why :data:`ACTIVE` is not the compiled set (empty when it is).
REASON: str = _choice.reason
#: The compiled set when it is in use, else ``None``.
COMPILED: Optional[Implementation] = ACTIVE if ACTIVE is not PURE else None
#: The extension module when the compiled set is in use, else ``None``.
EXTENSION: Optional[Extension] = _choice.extension
