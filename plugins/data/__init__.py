"""Data files shipped with the built-in plugins."""
