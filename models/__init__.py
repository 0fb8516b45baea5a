"""``remat.models``: decoder-only transformers that scan over layers, every
saveable tensor tagged with the checkpoint-name vocabulary."""
