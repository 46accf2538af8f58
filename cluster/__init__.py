"""Glue to a Ray cluster: connection, storage, per-trial resource arithmetic.

Imports neither ``tune_jobs`` nor ``trainers``.
"""
