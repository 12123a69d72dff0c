"""Prefect tasks: thin adapters that call one function of sdpo_core or the tracking helpers.

Tasks pass paths, URIs, run ids and small records between them, never models or tensors.
"""
