"""interknit.agent."""
