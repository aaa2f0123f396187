"""The engine interface and the engine-neutral memory arithmetic; the engines in subfolders."""
