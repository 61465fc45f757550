"""Studies: a grid of variants x seeds, each cell a DVC experiment of the whole pipeline, every run in
the project's MLflow store, and one report that compares the variants (`grpolab study`, `grpolab report`).

`spec` reads and validates a study file; `run` drives a run of the study (its options, lock, cells to do and
schedule), `progress` follows its cells, `experiments` runs one cell as a DVC experiment, `local` and `pool` are
the two places its cells run (processes here, flow runs on a Prefect work pool); `records` keeps the study in the
MLflow store, from which `report` builds the report.
"""
