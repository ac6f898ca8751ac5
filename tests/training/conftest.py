"""Fixtures the training tests share."""

import pytest
from _trainer_helpers import toy_file


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small toy file (2k rows) for tests that only need a few steps."""
    path, _ = toy_file(tmp_path_factory.mktemp("small") / "small.h5", n_rows=32 * 64, context_size=32)
    return path
