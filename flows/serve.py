"""One machine, no work pool and no worker: serve both flows as deployments from this process, which runs
each triggered flow run in a subprocess here (Ctrl-C stops serving). Needs a Prefect server that stays up
(`prefect server start`, PREFECT_API_URL pointing at it). `prefect.yaml` + a worker is the cluster's way.

    python flows/serve.py
    prefect deployment run grpolab-pipeline/pipeline --param overrides='["train.steps=50"]'
"""

from prefect import serve

from pipeline import pipeline
from study import study

if __name__ == "__main__":
    serve(pipeline.to_deployment(name="pipeline"),
          study.to_deployment(name="study", parameters={"study_file": "studies/credit.yaml", "jobs": 1}))
