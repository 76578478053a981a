import pytest

from tests.helpers.netns import netns
from tests.helpers.wsnic_proc import uplink_namespace


@pytest.fixture
def lab_host():
    """A namespace standing in for the host (with an uplink and a default route to an
    "upstream" namespace, as the lab profile's NAT needs) and that upstream namespace."""
    with netns("host") as host, netns("up") as upstream:
        uplink_namespace(host, upstream)
        yield host, upstream


@pytest.fixture
def host():
    """A namespace standing in for the host wsnic runs on."""
    with netns("host") as name:
        yield name
