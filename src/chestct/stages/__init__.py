"""The pipeline's stages, one module each, run by dvc.yaml as `python -m chestct.stages.<x>`.

Python runs this file before any stage module's own imports, which makes it the one place that
can cap the CPU kernels before NumPy, OpenCV and TensorFlow load (chestct.cpu): a stage then
gives the same bytes on every x86-64 machine with AVX2. Setting environment variables is this
package's only effect; nothing else imports it.
"""

from chestct.cpu import pin_kernels

pin_kernels()
