"""Model folders: finding, pulling, fetching and converting models."""
