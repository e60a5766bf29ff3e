"""The exception hierarchy of tigertunnel.

Low-level exceptions (``struct.error``, ``ValueError`` from a primitive,
``pyaegis.DecryptionError`` ...) never escape a parser or the crypto layer:
they are converted into one of these, so callers only ever handle our own
errors.
"""


class TunnelError(Exception):
    """Base class of every error tigertunnel raises on purpose."""


class ConfigError(TunnelError):
    """A command-line option, address or configuration value is invalid."""


class KeyFileError(TunnelError):
    """A key file cannot be used.

    :ivar path: the file's path.
    :ivar line: the 1-based line number at fault, or ``None``.
    :ivar reason: a short reason naming the reference's error where there is
        one (``InvalidKeyFormat``, ``InvalidKeySize``, ``DuplicateKeyId``,
        ``NoKeysFound``, ``KeyStoreFull``).
    """

    def __init__(self, path: str, reason: str, line: "int | None" = None,
                 detail: str = "") -> None:
        self.path = path
        self.reason = reason
        self.line = line
        self.detail = detail
        where = f"{path}:{line}" if line is not None else path
        msg = f"{where}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class FrameError(TunnelError):
    """A TigerBeetle frame is malformed (size out of range, padding not zero)."""


class ClusterMismatchError(FrameError):
    """A TigerBeetle frame carries a cluster id other than the configured one."""

    def __init__(self, expected: int, got: int) -> None:
        self.expected = expected
        self.got = got
        super().__init__(f"frame cluster {got} != configured cluster {expected}")


class MuxError(TunnelError):
    """The pool-connection byte stream is malformed (bad magic, type, size)."""


class AuthenticationError(TunnelError):
    """An encrypted frame failed to authenticate, or a hello hash did not match."""


class HandshakeError(TunnelError):
    """The handshake failed.

    :ivar status: the ServerHello status code involved, if any.
    """

    def __init__(self, message: str, status: "int | None" = None) -> None:
        self.status = status
        super().__init__(message)


class KEMError(TunnelError):
    """A hybrid-KEM operation failed (bad key or ciphertext, zero X25519 secret)."""


class KEMUnavailableError(KEMError):
    """KEM is configured but this installation cannot run ML-KEM-768 safely."""


class ReplayCacheError(TunnelError):
    """The replay cache file cannot be used (unreadable, not ours, wrong owner)."""


class ListenError(ConfigError):
    """A listening port cannot be bound (fatal at start-up)."""
