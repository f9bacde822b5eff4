"""placeholder, replaced by the adapter work."""
