"""Code the research/ notebooks call: exploration of a source (eda) and of a run's errors.

Tested like the rest of the package, so that what a notebook shows is tested code. Research
helpers are library code: they never import a stage or the runner (tests check the direction).
"""
