"""interknit.proxy."""
