"""Testing utilities for plait.

``plait.testing.cluster``: an emulated multi-host cluster built from Linux network namespaces (root only), with a
Python API, a CLI (``python -m plait.testing.cluster``) and a pytest fixture (``cluster_factory`` in tests/conftest.py).
"""
