"""Prefect flows of the sDPO pipeline, and the ``sdpo`` command."""
