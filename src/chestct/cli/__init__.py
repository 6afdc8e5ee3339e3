"""Commands a user runs beside the pipeline, each `python -m chestct.cli.<name>`.

`plan` and `preflight` (what a run will do, and whether the machine can), `presets` (apply a
params preset), `samples` (files to try the service with), `compare` (runs side by side),
`restore` (back to the committed state) and `repro` (run twice, compare).
"""
