"""The transformers engine: one thread owns the model, continuous batching. torch lives here."""
