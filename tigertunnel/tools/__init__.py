"""Tools around the tunnel: benchmark, demo, echo backend, traces."""
