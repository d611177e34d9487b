"""A policy's life: the model and its validation, and the store that applies and persists it."""
