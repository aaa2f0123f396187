"""The wire protocols: the public JSON protocol and legacy text mode, and the admin socket's."""
