import os

import pytest

from tests.distributed import free_port


@pytest.fixture(scope="session")
def single_process_group():
    """A world of one gloo process with megatron's groups at tp=1, for single-process model tests."""
    from pretrain import parallel

    saved = {
        key: os.environ.get(key) for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    os.environ.update(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    parallel.init_distributed(tp=1, pp=1, backend="gloo")
    yield
    parallel.destroy()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
