"""Flower glue: coordinator (ServerApp side), gossip mod and handlers (ClientApp side),
node state between messages, and block <-> record conversion."""
