"""Real-socket and real-process integration tests (127.0.0.1 only, bounded waits)."""
