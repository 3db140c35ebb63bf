"""Shipped model weights (package data): chest-ct-small.safetensors is what `inference.model = "bundled"` loads."""
