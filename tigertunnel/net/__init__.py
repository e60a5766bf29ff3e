"""Twisted glue: the TB-side protocol, pool connections, the multiplexer, the pool, listeners.

Lowest first: ``states`` (transition tables), ``stats`` (counters),
``streams`` (a pool connection's stream table), ``sockets`` and ``backoff``;
``frame_protocol`` (a session's TB-side connection), ``listeners``;
``tunnel_protocol`` (a pool connection); ``pool`` (pool slots);
``multiplexer`` (a proxy pair). They meet through the protocols of
:mod:`tigertunnel.interfaces`.
"""
