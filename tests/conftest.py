import os

import pytest
import torch

# The Triton kernels run on CPU tensors through Triton's interpreter in CI; the variable must be
# set before any @triton.jit function is created.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Hypothesis profiles for tests/test_fuzz.py: `ci` (the default, part of `make test`: derandomized,
# so CI runs the same examples every time, in bounded time) and `long` (HYPOTHESIS_PROFILE=long:
# ten times the examples, freshly random, before a release or after touching a kernel).
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=40, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("long", max_examples=400, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_runtest_setup(item):
    """A row of a backend that is broken in this install (tests/backends.py, `broken`) fails with
    the cause: a bug is never a reason to skip."""
    mark = item.get_closest_marker("backend_broken")
    if mark is not None:
        pytest.fail(mark.kwargs["reason"], pytrace=False)
