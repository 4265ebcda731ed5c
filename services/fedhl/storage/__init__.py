"""Persistence: tensors as safetensors (never pickle)."""
