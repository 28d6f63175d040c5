"""The gateway: composition root, configuration, subscriber registry, service loop and CLI."""
