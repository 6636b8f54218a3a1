import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without torch.cuda.is_available())")
    config.addinivalue_line("markers", "slow: large or long-running cases; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "plait_only: exercises plait-specific behaviour; skipped under PLAIT_TEST_BACKEND=gloo")


def pytest_report_header(config):
    return f"plait tests: backend under test = {H.BACKEND} (env PLAIT_TEST_BACKEND)"


def pytest_collection_modifyitems(config, items):
    cuda = None
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(600))
        if "gpu" in item.keywords:
            if cuda is None:
                import torch

                cuda = torch.cuda.is_available()
            if not cuda:
                item.add_marker(pytest.mark.skip(reason="no CUDA device (torch.cuda.is_available() is False)"))
        if "plait_only" in item.keywords and not H.IS_PLAIT:
            item.add_marker(pytest.mark.skip(reason=f"plait-only test; backend under test is {H.BACKEND}"))


@pytest.fixture(scope="session", autouse=True)
def _check_backend_importable():
    if H.IS_PLAIT:
        try:
            import plait  # noqa: F401
        except Exception as e:  # noqa: BLE001
            pytest.fail(
                f"`import plait` failed ({type(e).__name__}: {e}). Build it with "
                "`.venv/bin/pip install --no-build-isolation -e .`, or run the suite against gloo with "
                "PLAIT_TEST_BACKEND=gloo.",
                pytrace=False,
            )
