"""What clients talk to: the public WebSocket port and the admin socket."""
