"""Interoperability: crosscoders from the dictionary_learning forks in, SAELens SAEs and fork checkpoints
out, Hub-ready folders (docs/interop.md)."""
