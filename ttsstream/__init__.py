"""ttsstream: a WebSocket streaming speech server for Microsoft Edge's neural voices."""

__all__ = ["__version__"]

__version__ = "0.1.0"
