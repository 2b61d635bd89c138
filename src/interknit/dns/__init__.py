"""interknit.dns."""
