"""The generation service: model changes, admission, generation defaults."""
