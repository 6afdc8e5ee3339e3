"""Monitoring: what the service sees, compared with what the model was evaluated on.

Per-request signals and drift against the reference profile (`signals`), the audit log of
served answers (`audit`) and the report that reads that log back (`monitor`,
`python -m chestct.monitoring.monitor`).
"""
