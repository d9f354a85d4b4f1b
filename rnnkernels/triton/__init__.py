"""The Triton backend: the recurrence of one layer and direction as Triton kernels (kernels.py), their
host side (launch.py: checks, the persistent or per-step path, buffers) and operators (ops.py).

Importing it needs triton. TRITON_INTERPRET=1 at that moment runs the kernels in Triton's interpreter,
on CPU tensors (how the tests check them without a GPU); rnnkernels imports this package only when the
triton backend is first asked for.
"""

from .launch import DTYPES, INTERPRETED, PATH_ENV, choose_path
from .ops import recurrence, step

__all__ = ["DTYPES", "INTERPRETED", "PATH_ENV", "choose_path", "recurrence", "step"]
