"""Evaluations: perplexity by length, passkey, generation quality, speed; one results schema."""
