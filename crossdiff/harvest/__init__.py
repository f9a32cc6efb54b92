"""`crossdiff harvest`: both models on the same text, aligned pairs of activations into a store; the work
plan per torchrun rank and the merge of the ranks' shards. Imports crossdiff.core and crossdiff.inputs
(the torchrun process group is crossdiff/core/torchrun.py; layering: README.md)."""
