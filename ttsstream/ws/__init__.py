"""The WebSocket door: protocol v1's wire format and one session per connection."""
