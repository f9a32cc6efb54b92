"""The crosscoder and its training: sparsities, the sparse training path and its kernels, data-parallel
ranks, the functional share. Imports crossdiff.core and crossdiff.inputs (layering: README.md)."""
