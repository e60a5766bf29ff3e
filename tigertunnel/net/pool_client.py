"""ClientPoolProtocol: a tunnel client's pool connection.

It sends the ClientHello as soon as it is connected, becomes established
on the server's valid ServerHello, and opens the streams of the TB
connections placed on it (:meth:`ClientPoolProtocol.open_stream`). What it
shares with the server's side is in
:class:`~tigertunnel.net.tunnel_protocol.TunnelProtocol`.
"""

from typing import Optional

from tigertunnel.config.model import Role
from tigertunnel.errors import HandshakeError
from tigertunnel.interfaces import PoolHost, Session, StreamTransport
from tigertunnel.net.states import TransitionError
from tigertunnel.stats import HandshakeFailure
from tigertunnel.net.tunnel_protocol import TunnelProtocol
from tigertunnel.wire.codec import CLIENT, PoolCodec
from tigertunnel.wire.handshake import ClientHandshake


class ClientPoolProtocol(TunnelProtocol):
    """A tunnel client's pool connection.

    :param handshake: the client handshake, or ``None`` in plaintext mode.
    :param host: the proxy pair's multiplexer.
    :param name: names the pool connection in logs.
    """

    role = Role.CLIENT
    _handshake: Optional[ClientHandshake]

    def __init__(self, handshake: Optional[ClientHandshake],
                 host: "PoolHost[TunnelProtocol]", name: str) -> None:
        super().__init__(handshake, host, name)

    def _start_handshake(self, tcp: StreamTransport) -> None:
        if self._handshake is not None:
            tcp.write(self._handshake.start())

    def _handshake_data(self, data: bytes) -> None:
        self.host.handshake_progress(self, len(data))
        hs = self._handshake
        if hs is None:
            return
        try:
            est = hs.feed(data)
        except HandshakeError as e:
            self.host.handshake_failed(self, str(e), HandshakeFailure.refused(e.status))
            self._fail_handshake(e)
            return
        if est is None:
            return
        self.key_use = est.key_use
        self._established(PoolCodec(CLIENT, est.keys, self.host.cluster_value),
                          est.leftover)

    def open_stream(self, session: Session) -> int:
        """Open a new stream for ``session`` and return its id."""
        codec = self.codec
        if codec is None:
            raise TransitionError(f"pool connection {self.name}: cannot open "
                                  f"a stream in state {self.state.name}")
        stream_id = self.streams.open(session)
        session.attached(self, stream_id)
        self._output().writeSequence(codec.encode_open(stream_id))
        return stream_id
