"""Sans-IO wire formats: TB frames, mux frames, the pool-connection codec, the handshake."""
