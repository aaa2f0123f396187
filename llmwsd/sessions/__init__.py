"""Sessions: the resumable event buffers and their encrypted on-disk log."""
