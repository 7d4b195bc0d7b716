"""pothead: a reverse-HTTP load balancer for expensive, non-concurrent requests, on Twisted."""

__version__ = "0.1.0"
