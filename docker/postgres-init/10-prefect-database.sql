-- One PostgreSQL server, two databases: `mlflow` (MLflow's backend store) is POSTGRES_DB, created by
-- the image's entrypoint; this creates Prefect's. The entrypoint runs the files of
-- /docker-entrypoint-initdb.d once, when it initialises an empty data volume, as POSTGRES_USER
-- (which then owns the database).
CREATE DATABASE prefect;
