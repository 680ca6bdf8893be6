"""A few seeds of the architecture fuzz in CI (python tests/fuzz_vits.py --cases 200 for the long run)."""
import os

import pytest

from fuzz_vits import run_case

CASES = int(os.environ.get("MERGEPASS_FUZZ_CASES", "16"))


@pytest.mark.parametrize("seed", range(CASES))
def test_random_vit_and_recipe(seed):
    assert run_case(seed) in ("merged", "unmerged", "declined")
