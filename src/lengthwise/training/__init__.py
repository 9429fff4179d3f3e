"""Training of the project's own small reference models."""
