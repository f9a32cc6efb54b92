"""`crossdiff harvest`: both models on the same text, aligned pairs of activations into a store; the work
plan per torchrun rank and the merge of the ranks' shards. Imports crossdiff.core, crossdiff.inputs and,
for the torchrun process group only, crossdiff.coder.distributed (layering: README.md)."""
