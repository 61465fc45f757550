"""Studies: a grid of variants x seeds, each cell a DVC experiment of the whole pipeline, every run in
the project's MLflow store, and one report that compares the variants (`grpolab study`, `grpolab report`).

`spec` reads and validates a study file, `run` runs its cells, `report` builds the report from MLflow.
"""
