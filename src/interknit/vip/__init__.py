"""interknit.vip."""
