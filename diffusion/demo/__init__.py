"""Tiny seeded models in the real architectures and file layouts (checkpoint) and demo
embedding / LoRA / hypernetwork files (extras), so workflows run with no download."""
