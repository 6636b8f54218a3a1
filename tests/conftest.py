import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as H  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without torch.cuda.is_available())")
    config.addinivalue_line("markers", "slow: large or long-running cases; deselect with -m 'not slow'")
    config.addinivalue_line("markers", "plait_only: exercises plait-specific behaviour; skipped under PLAIT_TEST_BACKEND=gloo")
    config.addinivalue_line("markers", "kernel_child: starts a child process with PLAIT_KERNELS=scalar "
                                       "(tests/test_kernels.py; deselected inside that child)")


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


# ---- emulated multi-host cluster (plait.testing.cluster) -------------------------------------------------------


def _cluster_module():
    """plait.testing.cluster; loaded from its file when the plait package cannot be imported (e.g. not built and
    running under PLAIT_TEST_BACKEND=gloo): the module itself is pure Python and needs neither torch nor plait."""
    try:
        import plait.testing.cluster as mod
    except Exception:  # noqa: BLE001
        import importlib.util

        name = "plait_testing_cluster_standalone"
        mod = sys.modules.get(name)
        if mod is None:
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "plait", "testing",
                                "cluster.py")
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[name] = mod
            spec.loader.exec_module(mod)
    return mod


_pytest_configure_base = pytest_configure


def pytest_configure(config):  # noqa: F811 -- extends the hook above (a module has one pytest_configure)
    _pytest_configure_base(config)
    config.addinivalue_line("markers", "cluster: needs an emulated multi-host cluster (root + iproute2, else skipped)")


@pytest.fixture
def cluster_factory():
    """``make(hosts, rate=None, **kw) -> Cluster`` (already up). Every cluster made is torn down when the test ends,
    pass or fail. Skips the test when emulated clusters are unavailable here (needs root, ip and tc)."""
    cl = _cluster_module()
    ok, reason = cl.available()
    if not ok:
        pytest.skip(f"emulated cluster needs root and iproute2: {reason}")
    made = []

    def make(hosts, rate=None, **kw):
        c = cl.Cluster(hosts=hosts, rate=rate, **kw)
        made.append(c)
        c.up()
        return c

    yield make
    errors = []
    for c in reversed(made):
        try:
            c.down()
        except Exception as e:  # noqa: BLE001
            errors.append(f"{c.name}: {e}")
    if errors:
        pytest.fail("cluster teardown failed: " + "; ".join(errors), pytrace=False)
