import os

import pytest

from tests.helpers.netns import netns as _netns


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def ns():
    """A throwaway wsnt- network namespace with loopback up."""
    with _netns("t") as name:
        yield name
