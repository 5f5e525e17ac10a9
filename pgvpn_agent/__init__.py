"""pgvpn agent: an IP tunnel whose only transport is PostgreSQL."""
