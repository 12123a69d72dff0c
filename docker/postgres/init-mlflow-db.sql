-- Runs once, when the PostgreSQL volume is first initialised: POSTGRES_DB creates Prefect's
-- database, this creates MLflow's (tracking and model registry) on the same server.
CREATE DATABASE mlflow;
