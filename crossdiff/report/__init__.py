"""`crossdiff report`: the static HTML report, its HTML helpers, SVG plots and assets (templates/).
Imports crossdiff.core and crossdiff.analysis (layering: README.md)."""
