"""twistd plugins: ``twistd tigertunnel server|client ...`` and ``twistd --reactor=tigertunnel-epoll``."""

from twisted.application.reactors import Reactor
from twisted.application.service import ServiceMaker

tigertunnel = ServiceMaker(
    "tigertunnel", "tigertunnel.tap",
    "Encrypted, multiplexed tunnel for TigerBeetle traffic.", "tigertunnel")

# twistd --reactor=tigertunnel-epoll: tigertunnel/net/reactor.py
tigertunnel_epoll = Reactor(
    "tigertunnel-epoll", "tigertunnel.net.reactor",
    "epoll reactor without a logging context per socket event (tigertunnel)")
