"""Usage: counter polling, usage records, journal, ZeroMQ publisher, billing client."""
