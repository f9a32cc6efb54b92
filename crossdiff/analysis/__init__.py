"""What a trained crosscoder found: per-latent results and verdicts, evidence, probes, splice-in loss,
behavioural verification, steering, seed stability. Imports crossdiff.core, crossdiff.inputs and
crossdiff.coder (layering: README.md)."""
