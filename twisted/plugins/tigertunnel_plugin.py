"""twistd plugin: ``twistd tigertunnel server|client ...``."""

from twisted.application.service import ServiceMaker

tigertunnel = ServiceMaker(
    "tigertunnel", "tigertunnel.tap",
    "Encrypted, multiplexed tunnel for TigerBeetle traffic.", "tigertunnel")
