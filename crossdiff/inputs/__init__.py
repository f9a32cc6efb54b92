"""What a diff reads: the two models, the text (corpora, conversations, generated answers), the alignment
of two tokenisations, the paired-activation store, and the controls' changed inputs (derived stores, the
models as a control changes them). Imports only crossdiff.core (layering: README.md)."""
