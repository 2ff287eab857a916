"""rtvc: streaming real-time voice changer."""

__version__ = "0.1.0"
