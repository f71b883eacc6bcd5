"""A real `ecanfnet serve` process on a loopback port, for the API, fuzz and browser tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from ecanfnet.testing import ServeProcess
from helpers import HARDENED_MAX_CONNECTIONS, HTML_LABEL

# The API key of the `keyed` server.
API_KEY = "v2-s3cret"


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


@pytest.fixture(scope="package")
def keyed(three_class_folder):
    """The 3-class 64 px checkpoint behind an API key, batches of at most 2 images, a 1 MiB body limit: for the
    /v2 key, bound and hostile-request tests."""
    srv = ServeProcess(three_class_folder, "--backend", "torch", "--max-batch", "2", "--max-upload-bytes",
                       str(2 ** 20), "--model-name", "three", env={"ECANFNET_API_KEY": API_KEY})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_engine():
    """An in-process engine (torch backend) of a randomised 3-class model at 64 px, labels cat, dog, fish."""
    from ecanfnet import create_model
    from ecanfnet.serving.engine import InferenceEngine
    from ecanfnet.testing import randomize_

    model = randomize_(create_model(pretrained=False, num_classes=3), seed=1).eval()
    model.pretrained_cfg = model.pretrained_cfg.replace(input_size=(3, 64, 64), test_input_size=(3, 64, 64),
                                                        label_names=["cat", "dog", "fish"])
    return InferenceEngine(model, "torch")
