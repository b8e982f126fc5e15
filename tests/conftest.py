import os

import numpy as np
import pytest
import torch

from protege.cli import configure_rendering

configure_rendering()  # before anything imports mujoco: OSMesa offscreen rendering when installed

# deterministic, quiet tests on a 2-core box
os.environ.setdefault("TQDM_DISABLE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


def make_episode(rng: np.random.Generator, length: int, image: bool = False) -> dict[str, np.ndarray]:
    ep = {
        "obs/state": rng.standard_normal((length, 5)).astype(np.float32),
        "action": rng.standard_normal((length, 3)).astype(np.float32),
    }
    if image:
        ep["obs/cam"] = rng.integers(0, 255, (length, 8, 8, 3), dtype=np.uint8)
    return ep


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
