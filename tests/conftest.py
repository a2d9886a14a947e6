"""Shared pytest configuration: one torch thread by default, `cuda` marker (skipped without a GPU), repository root on sys.path."""
import os
import pathlib
import sys

# One intra-op thread unless the caller says otherwise (also inherited by CLI subprocesses). The tests use tiny
# tensors, where OpenMP only adds sync cost; on a shared 2-core machine a second thread that is descheduled makes
# each small op wait (measured: a (1, 128, 5) depthwise conv1d took 64 ms instead of 0.06 ms under load, and
# test_session.py + test_duplex_inference.py ran in 9 s instead of 18 s with OMP_NUM_THREADS=1).
if not os.environ.get("OMP_NUM_THREADS", "").isdigit():
    os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped otherwise)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
