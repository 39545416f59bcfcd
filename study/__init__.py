"""The study's machinery, importable without torch (the Snakefile imports it to lay out the DAG): the study config
and its checks, the cost plan, checksums and safe loading, atomic writes and the checked table readers."""
