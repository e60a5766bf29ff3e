"""Operations: reload, shutdown, metrics, systemd, workers, memory."""
