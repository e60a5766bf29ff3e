"""Twisted glue: the TB-side protocol, pool connections, the multiplexer, the pool, listeners, sockets."""
