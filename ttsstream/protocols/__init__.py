"""The WebSocket protocols: pure state machines, frames in, actions out (no I/O)."""
