"""Transformer language models, KV caches and checkpoint loaders for decodax."""
