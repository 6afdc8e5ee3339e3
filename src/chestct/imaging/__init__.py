"""Imaging: from file bytes to the model's input, the same way in training and in serving.

decode with its budgets (`formats`, `headers` with `jpeg`, `decoding`, `dicom`, `dicom_walk`,
`dicom_pixels`), prepare
with crops and masks (`body`, `lungs`, `preparation`), the acquisition shifts of the
stress set (`perturb`), files back out (`encoding`) and the process pool (`workers`).
Imaging imports nothing of chestct outside itself.
"""
