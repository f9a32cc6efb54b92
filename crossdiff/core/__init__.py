"""The base layer: user-facing errors, typed configs, atomic file writes, process-wide runtime policy and
the stage record of multi-stage commands. Imports nothing else of crossdiff (layering: README.md)."""
