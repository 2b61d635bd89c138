"""interknit.demand."""
