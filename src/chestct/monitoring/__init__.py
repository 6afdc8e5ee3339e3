"""Monitoring: what the service sees, compared with what the model was evaluated on.

Per-request signals and the reference profile (`signals`), drift against it (`drift`), the
audit log of served answers (`audit`) and the monitor that reads that log back and reports
(`monitor`, `python -m chestct.monitoring.monitor`, with `drift_report`).
"""
