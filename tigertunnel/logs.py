"""Logging for tigertunnel: one level filter in front of twisted.logger.

Every module gets its logger from :func:`logger`; those loggers publish
through a single :class:`FilteringLogObserver` whose level ``--log-level``
sets, so the level works the same under ``twistd`` (whose observers we do not
own) and in the foreground console script. Log events carry named fields
(``pair``, ``link``, ``stream``, ``peer``); never keys, nonces or payloads.
"""

from typing import Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    globalLogPublisher,
)
from zope.interface import implementer

LEVELS = {
    "err": LogLevel.error, "error": LogLevel.error,
    "warn": LogLevel.warn, "warning": LogLevel.warn,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
}

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)


@implementer(ILogObserver)
class _ToGlobal:
    """Forward to whatever the global publisher is at the time of the event."""

    def __call__(self, event: Any) -> None:
        globalLogPublisher(event)


_filtered = FilteringLogObserver(_ToGlobal(), [_predicate])


def set_level(name: str) -> None:
    """Set the minimum level of tigertunnel's log events.

    :param name: ``err``, ``warn``, ``info`` or ``debug``.
    :raises KeyError: unknown level name.
    """
    _predicate.setLogLevelForNamespace("", LEVELS[name])


def logger(namespace: str) -> Logger:
    """Return a logger for ``namespace`` that honours ``--log-level``."""
    return Logger(namespace=namespace, observer=_filtered)
