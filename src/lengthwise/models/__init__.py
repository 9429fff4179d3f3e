"""Per-family facts and adapters."""
