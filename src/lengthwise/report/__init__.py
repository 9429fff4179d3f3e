"""Tables (Markdown / terminal) and plots (PNG) from results records."""
