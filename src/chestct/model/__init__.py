"""Model: the families chestct trains and serves, and what turns their outputs into answers.

The CNN (`modeling`, trained through `training` with its input pipeline `inputs`, its
fitting loop `fitting`, `callbacks` and `distributed`; `gradcam`), the texture family
(`texture`), the family interface over both (`families`), calibration and refusal
(`calibration`) and the export to the served artefact (`export`). Model imports the core
modules only, never data or evaluation.
"""
