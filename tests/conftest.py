import os

import torch

# The Triton kernels run on CPU tensors through Triton's interpreter in CI; the variable must be
# set before any @triton.jit function is created.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
