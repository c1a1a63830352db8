"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread for a module: on a shared 2-core machine multi-threaded CPU kernels spin against
    each other (up to ~100x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pare_demo():
    """The bundled demo model on the CPU (one per test module: it is read-only in the tests)."""
    import occbench
    return occbench.load_model("pare-demo", device="cpu")


@pytest.fixture(scope="module")
def demo_set():
    """The 32-sample demo dataset (generated into the cache on first use)."""
    import occbench
    return occbench.open_dataset("demo")
