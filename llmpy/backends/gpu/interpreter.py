"""Triton's CPU interpreter (TRITON_INTERPRET=1), which runs the kernels when there is no GPU:
the launch sizes that suit it, and a fix for it."""
import torch
from triton.runtime import interpreter

# Rows per program for the row-wise kernels: one on a GPU (a row of 768 already fills the
# warps); many in the interpreter, whose cost is per program and per operation, not per element.
ROWS = 1 if torch.cuda.is_available() else 16
# Elements per program for the elementwise kernels.
ELEMENTS = 1024 if torch.cuda.is_available() else 16384


def fix_loop_bounds():
    """The interpreter keeps every scalar as a 1-element array and makes a Python int of it with
    int(array), which NumPy >= 2.4 refuses for arrays of ndim > 0: `for i in range(lo, hi)`
    with run-time bounds fails. This converts with .item() instead."""
    patch = interpreter._patch_lang_tensor
    if getattr(patch, "fixed", False):
        return

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    patched.fixed = True
    interpreter._patch_lang_tensor = patched
