"""Corpora and synthetic task generators."""
