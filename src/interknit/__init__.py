"""interknit: the interconnect layer that knits many instances of many services into one system."""

__version__ = "0.1.0"
