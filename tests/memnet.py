"""An in-memory network for end-to-end tests: iosim pumps and a Clock.

``MemoryNetwork`` maps addresses to listening factories; its endpoints
connect a client protocol to a freshly built server protocol through an
``iosim`` pump. :meth:`MemoryNetwork.flush` moves bytes on every connection
until nothing moves. Nothing here touches a socket or the wall clock.
"""

from typing import Any, Callable, Dict, List, Optional, Tuple

from twisted.internet import defer
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from zope.interface import implementer

from tigertunnel.config.model import Address, ProxyPair, Role, TunnelConfig, parse_address
from tigertunnel.keys.format import KeyStore, parse_key_text
from tigertunnel.wire.frames import FrameParser
from tigertunnel.net.multiplexer import ClientMultiplexer, ServerMultiplexer

PSK_HEX = "a1" * 32
PSK_TEXT = f"1732712345000000000:{PSK_HEX}\n".encode()
KEM_SEED = bytes(range(32))
KEM_KEY_ID = 77


def psk_store(text: bytes = PSK_TEXT) -> KeyStore:
    """A PSK key store parsed from key-file text."""
    return parse_key_text(text, "test.key", 32)


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, net: "MemoryNetwork", address: Address) -> None:
        self._net = net
        self._address = address

    def connect(self, factory: Factory) -> "defer.Deferred[Protocol]":
        self._net.connect_attempts.append(self._address)
        server_factory = self._net.listeners.get(self._address)
        if server_factory is None or self._address in self._net.refusing:
            return defer.fail(ConnectionRefusedError(str(self._address)))
        proto = factory.buildProtocol(iosim.FakeAddress())
        if proto is None:
            return defer.fail(ConnectionRefusedError("factory refused"))
        self._net.join(server_factory, proto)
        return defer.succeed(proto)


class MemoryNetwork:
    """Listening factories by address, and the pumps of open connections."""

    def __init__(self, clock: Optional[MemoryReactorClock] = None) -> None:
        self.clock = clock or MemoryReactorClock()
        self.listeners: Dict[Address, Factory] = {}
        self.refusing: set = set()
        self.pumps: List[iosim.IOPump] = []
        self.connect_attempts: List[Address] = []

    def listen(self, address: Address, factory: Factory) -> None:
        """Make ``factory`` accept connections to ``address``."""
        self.listeners[address] = factory

    def endpoint_for(self, pair: ProxyPair) -> IStreamClientEndpoint:
        """An endpoint reaching ``pair.target`` on this network."""
        return _MemoryEndpoint(self, pair.target)

    def join(self, server_factory: Factory, client: Protocol) -> iosim.IOPump:
        """Connect ``client`` to a new protocol of ``server_factory``."""
        server = server_factory.buildProtocol(iosim.FakeAddress())
        pump = iosim.connect(server, iosim.makeFakeServer(server), client,
                             iosim.makeFakeClient(client), greet=False,
                             clock=self.clock)
        self.pumps.append(pump)
        return pump

    def dial(self, address: Address, client: Protocol) -> iosim.IOPump:
        """Connect a test protocol (a TB client) to a listener."""
        return self.join(self.listeners[address], client)

    def flush(self) -> None:
        """Move bytes and disconnects on every connection until all is still."""
        for _ in range(10_000):
            self.clock.advance(0)
            moved = False
            for pump in list(self.pumps):
                if pump.pump(advanceClock=False):
                    moved = True
            self.pumps = [p for p in self.pumps
                          if not (p.clientIO.disconnected and p.serverIO.disconnected)]
            if not moved:
                return
        raise AssertionError("network never settled")

    def advance(self, seconds: float) -> None:
        """Advance the clock in small steps, flushing between them."""
        steps = max(1, int(seconds / 0.05))
        for _ in range(steps):
            self.clock.advance(seconds / steps)
            self.flush()


class TBPeer(Protocol):
    """A scripted TB endpoint (client or replica) that records frames.

    :param on_frame: called with (peer, frame) for each complete frame; the
        default records only.
    """

    def __init__(self, on_frame: Optional[Callable[["TBPeer", bytes], None]] = None) -> None:
        self.parser = FrameParser()
        self.received: List[bytes] = []
        self.on_frame = on_frame
        self.lost = False
        self.made = False

    def connectionMade(self) -> None:
        self.made = True

    def dataReceived(self, data: bytes) -> None:
        for frame in self.parser.feed(data):
            self.received.append(frame)
            if self.on_frame is not None:
                self.on_frame(self, frame)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True

    def send(self, *frames: bytes) -> None:
        """Write TB frames to the tunnel."""
        self.transport.writeSequence(list(frames))


class BackendFactory(Factory):
    """A fake replica: builds :class:`TBPeer` with a behaviour, keeps them."""

    noisy = False

    def __init__(self, on_frame: Optional[Callable[[TBPeer, bytes], None]] = None) -> None:
        self.on_frame = on_frame
        self.peers: List[TBPeer] = []

    def buildProtocol(self, addr: Any) -> TBPeer:
        peer = TBPeer(self.on_frame)
        self.peers.append(peer)
        return peer


def echo(peer: TBPeer, frame: bytes) -> None:
    """Backend behaviour: send every frame straight back."""
    peer.send(frame)


class Tunnel:
    """A tunnel client and server for one proxy pair on a MemoryNetwork.

    Addresses: TB clients dial ``client_addr``; the client's pool connects to
    ``server_addr``; the server's streams connect to ``backend_addr``.
    """

    client_addr = parse_address("127.0.0.1:4000", "")
    server_addr = parse_address("127.0.0.1:3000", "")
    backend_addr = parse_address("127.0.0.1:3001", "")

    def __init__(self, backend: Optional[BackendFactory] = None, *,
                 client_cfg: Optional[Dict[str, Any]] = None,
                 server_cfg: Optional[Dict[str, Any]] = None,
                 psk: Optional[KeyStore] = None, plaintext: bool = False,
                 pool_size: int = 2) -> None:
        self.net = MemoryNetwork()
        self.clock = self.net.clock
        self.backend = backend or BackendFactory(echo)
        keys = None if plaintext else (psk or psk_store())
        ccfg = TunnelConfig("client", [ProxyPair(0, self.client_addr, self.server_addr)],
                            psk=keys, pool_size=pool_size, **(client_cfg or {}))
        scfg = TunnelConfig("server", [ProxyPair(0, self.server_addr, self.backend_addr)],
                            psk=keys, **(server_cfg or {}))
        self.server = ServerMultiplexer(scfg, scfg.pairs[0], self.clock,
                                        self.net.endpoint_for)
        self.client = ClientMultiplexer(ccfg, ccfg.pairs[0], self.clock,
                                        self.net.endpoint_for, rand=lambda: 0.5)
        self.net.listen(self.server_addr, self.server.tunnel_factory)
        self.net.listen(self.backend_addr, self.backend)
        self.net.listen(self.client_addr, self.client.frame_factory)

    def start(self) -> None:
        """Start both ends and let the pool connections come up."""
        self.server.startService()
        self.client.startService()
        self.net.flush()

    def stop(self) -> None:
        """Stop both ends."""
        self.client.stopService()
        self.server.stopService()
        self.net.flush()

    def tb_client(self, on_frame: Optional[Callable[[TBPeer, bytes], None]] = None) -> Tuple[TBPeer, iosim.IOPump]:
        """Connect a new TB client to the tunnel client's listener."""
        peer = TBPeer(on_frame)
        pump = self.net.dial(self.client_addr, peer)
        self.net.flush()
        return peer, pump

    def reference_client_link(self) -> "Tuple[Any, List[bytes]]":
        """A pool connection from a version-1 (reference) client, and what it receives after its handshake."""
        from tigertunnel.wire.handshake import ClientHandshake
        from tigertunnel.net.pool_client import ClientPoolProtocol

        link = ClientPoolProtocol(ClientHandshake(*psk_store().first(), version=1,
                                                  now=self.clock.seconds),
                                  self.client, "v1")
        self.net.dial(self.server_addr, link)
        self.net.flush()
        received: List[bytes] = []
        original = link.dataReceived
        link.dataReceived = lambda data: (received.append(data), original(data))  # type: ignore[method-assign]
        return link, received
