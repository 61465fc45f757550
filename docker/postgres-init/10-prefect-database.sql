-- One PostgreSQL server, three databases: `mlflow` (MLflow's backend store) is POSTGRES_DB, created
-- by the image's entrypoint; this creates Prefect's and `mlflow_auth` (the users of MLflow's basic
-- authentication). The entrypoint runs the files of /docker-entrypoint-initdb.d once, when it
-- initialises an empty data volume, as POSTGRES_USER (which then owns the databases).
CREATE DATABASE prefect;
CREATE DATABASE mlflow_auth;
