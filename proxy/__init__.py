"""aiolb: an asyncio layer-7 HTTP/1.1 reverse proxy and load balancer."""

__version__ = "0.1.0"
