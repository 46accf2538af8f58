"""Code that runs inside one Ray Train worker (or a plain process).

Never imports ``ray.tune``, ``tune_jobs`` or ``cluster``: everything a worker
needs arrives in the config dict it is handed.
"""
