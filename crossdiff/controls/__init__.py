"""Controls with a known answer: synthetic stores and the toy benchmark (`crossdiff bench toy`), and
`crossdiff calibrate`'s planted and null controls on real models. The top layer below the commands: it
runs every stage, at the budget's settings (crossdiff/budget.py) (layering: README.md)."""
