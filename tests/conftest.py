"""Fixtures shared by the test modules in tests/."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """The launcher tests' config: TINY as a YAML file (launch_util.write_tiny_config)."""
    from launch_util import write_tiny_config

    return write_tiny_config(tmp_path_factory.mktemp("config"))


@pytest.fixture(scope="session")
def bpe_data(tmp_path_factory) -> Path:
    """Shards of a small corpus with a trained BPE of 300 tokens (interop_util.make_bpe_data)."""
    from interop_util import make_bpe_data

    return make_bpe_data(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, bpe_data):
    """`trained(name)`: a run of interop_util.RUNS / IMPORTED, trained once per session on first use
    (tests/test_interop.py and tests/test_reshard.py share them)."""
    from interop_util import trained_runs

    return trained_runs(tmp_path_factory, bpe_data)
