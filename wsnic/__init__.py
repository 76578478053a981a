"""wsnic: connect WebSocket clients (v86, jor1k, ...) to a real virtual Linux network."""

__version__ = "0.1.0"
