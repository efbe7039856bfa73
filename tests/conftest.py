import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def real_la_root() -> Path | None:
    """The real LA data: $SSL_BENCH_DATA, else ../shared/data/LA beside the checkout."""
    env = os.environ.get("SSL_BENCH_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "LA"]:
        if (cand / "train.list").is_file():
            return cand
    return None


@pytest.fixture(scope="session")
def la_root() -> Path:
    root = real_la_root()
    if root is None:
        pytest.skip("real LA data not found: set SSL_BENCH_DATA or place it at ../shared/data/LA")
    return root


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory) -> Path:
    from ssl_bench.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo") / "LA")


@pytest.fixture
def one_thread():
    """torch on one thread for the test (on a shared 2-core machine, 2 threads can run far slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
