"""interknit.balance."""
