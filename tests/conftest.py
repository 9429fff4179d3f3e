import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny matmuls on a shared 2-core machine, where a second thread only waits for
    its share of the cores (3-10x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class SearchKiller:
    """Stops a LongRoPE search at a generation, as a SIGKILL would: `on_generation=killer.at(N)`, then
    `pytest.raises(killer.Killed)`."""

    class Killed(Exception):
        pass

    def at(self, generation: int):
        def on_generation(phase, row):
            if row["generation"] == generation:
                raise self.Killed

        return on_generation


@pytest.fixture
def search_killer():
    return SearchKiller()
