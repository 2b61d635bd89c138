"""interknit.health."""
