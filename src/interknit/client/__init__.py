"""interknit.client."""
