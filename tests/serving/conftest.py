"""A real `ecanfnet serve` process on a loopback port, for the API, fuzz and browser tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecanfnet.testing import ServeProcess
from helpers import HARDENED_MAX_CONNECTIONS, HTML_LABEL



@pytest.fixture(scope="package")
def server(timm_hub_folder):
    """The default configuration (backend auto: OpenVINO on this CPU where installed), batches of up to 8."""
    srv = ServeProcess(timm_hub_folder, "--max-batch", "8", "--max-wait-ms", "20")
    yield srv
    srv.stop()


@pytest.fixture(scope="package")
def three_class_folder(tmp_path_factory) -> Path:
    """A randomly initialised 3-class checkpoint at 64 px, one of whose labels is HTML."""
    from hostile import small_model_folder

    return small_model_folder(tmp_path_factory.mktemp("three_class"), 3, [HTML_LABEL, "dog", "fish"], size=64)


@pytest.fixture(scope="package")
def hardened(three_class_folder):
    """A 3-class server with short timeouts, one decode thread and HARDENED_MAX_CONNECTIONS, for the flood,
    slow-client and connection-limit tests."""
    srv = ServeProcess(three_class_folder, "--backend", "torch", "--max-batch", "2", "--max-queue", "30",
                 "--max-wait-ms", "5", "--timeout-s", "3", "--body-timeout-s", "2", "--header-timeout-s", "2",
                 "--decode-workers", "1", "--max-connections", str(HARDENED_MAX_CONNECTIONS))
    yield srv
    srv.stop()


