"""Test-wide skipping rules: `gpu` tests run only where a CUDA device is usable."""

from __future__ import annotations

import pytest


def _cuda_unavailable_reason():
    import kvttl

    probe = kvttl.cuda_probe()
    if probe["num_devices"] > 0:
        return None
    return f"no usable CUDA device: {probe['error']}"


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    reason = _cuda_unavailable_reason()
    if reason:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=reason))
