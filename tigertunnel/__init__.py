"""tigertunnel: an encrypted, multiplexed tunnel for TigerBeetle traffic.

Wire-compatible with the Zig implementation of tigertunnel (see README.rst).
"""

__version__ = "0.1.0"
