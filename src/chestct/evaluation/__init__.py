"""Evaluation: how good a model is, how sure that figure is, and what it is measured against.

Metrics and their intervals (`metrics`, `uncertainty`), scoring a model on a split and under
acquisition shift (`scoring`, `external`), the files a model is served from, exported and
checked (`release`), what evaluate writes (`outputs`), the memorizer baseline and the novel part
(`novelty`), where the model looks (`attention`), the pictures (`plots`, `plotpage`), what
training chooses on the valid split (`tuning`) and promote's rules (`selection`).
"""
