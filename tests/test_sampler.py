import numpy as np
import pytest
import torch
import zarr
from conftest import make_episode

from protege.datasets.normalizer import Normalizer
from protege.datasets.replay_buffer import ReplayBuffer
from protege.datasets.sampler import SequenceSampler, WindowDataset, split_episodes


def reference_windows(buffer, obs_keys, n_obs, horizon, pad_before, pad_after, horizon_keys=()):
    """Slow, obviously-correct version: loop over episodes, window starts and steps."""
    out = []
    ends = list(buffer.episode_ends)
    for e, hi in enumerate(ends):
        lo = ends[e - 1] if e else 0
        last_start = max(hi - horizon + pad_after, lo - pad_before)
        for s in range(lo - pad_before, last_start + 1):
            w = {k: [] for k in [*obs_keys, "action", "action_is_pad"]}
            for j in range(horizon):
                t = s + j
                src = min(max(t, lo), hi - 1)
                for k in obs_keys:
                    if j < n_obs or k in horizon_keys:
                        w[k].append(buffer.data[k][src])
                w["action"].append(buffer.data["action"][src])
                w["action_is_pad"].append(not lo <= t < hi)
            out.append({k: np.array(v) for k, v in w.items()})
    return out


@pytest.mark.parametrize("n_obs,horizon,pads", [(1, 1, None), (2, 16, None), (2, 16, (1, 7)), (3, 5, (0, 0)), (2, 10, (4, 12))])
def test_vectorised_windows_equal_reference(rng, n_obs, horizon, pads):
    buf = ReplayBuffer.create(zarr.storage.MemoryStore(), fps=10)
    for n in rng.integers(1, 25, size=12):
        buf.append_episode(make_episode(rng, int(n), image=True))
    mem = ReplayBuffer.load(buf)
    pad_before, pad_after = pads if pads else (None, None)
    sampler = SequenceSampler(mem, ["obs/state", "obs/cam"], n_obs, horizon, pad_before=pad_before, pad_after=pad_after)
    ref = reference_windows(mem, ["obs/state", "obs/cam"], n_obs, horizon,
                            n_obs - 1 if pad_before is None else pad_before, horizon - n_obs if pad_after is None else pad_after)
    assert len(sampler) == len(ref)
    idx = rng.permutation(len(sampler))
    batch = sampler.gather(idx)
    for b, i in enumerate(idx):
        for k in ref[i]:
            np.testing.assert_array_equal(batch[k][b], ref[i][k], err_msg=f"window {i} key {k}")


def test_horizon_obs_keys_cover_the_whole_window(rng):
    """ACT-JEPA's future proprioception: chosen keys span the horizon (edge-padded), the rest n_obs steps."""
    buf = ReplayBuffer.create(zarr.storage.MemoryStore(), fps=10)
    for n in rng.integers(1, 15, size=6):
        buf.append_episode(make_episode(rng, int(n), image=True))
    mem = ReplayBuffer.load(buf)
    sampler = SequenceSampler(mem, ["obs/state", "obs/cam"], 1, 6, horizon_obs_keys=["obs/state"])
    ref = reference_windows(mem, ["obs/state", "obs/cam"], 1, 6, 0, 5, horizon_keys=["obs/state"])
    batch = sampler.gather(np.arange(len(sampler)))
    assert batch["obs/state"].shape[1] == 6 and batch["obs/cam"].shape[1] == 1
    for i, w in enumerate(ref):
        for k in w:
            np.testing.assert_array_equal(batch[k][i], w[k], err_msg=f"window {i} key {k}")
    with pytest.raises(ValueError, match="horizon_obs_keys"):
        SequenceSampler(mem, ["obs/state"], 1, 6, horizon_obs_keys=["obs/other"])


def test_every_step_is_a_current_step_with_default_padding(rng):
    buf = ReplayBuffer.create(zarr.storage.MemoryStore(), fps=10)
    buf.append_episode(make_episode(rng, 7))
    sampler = SequenceSampler(ReplayBuffer.load(buf), ["obs/state"], 2, 8)
    current = sampler.gather(np.arange(len(sampler)))["obs/state"][:, -1]
    np.testing.assert_array_equal(current, buf.data["obs/state"][:])


def test_dataloader_path_matches_sampler(rng):
    buf = ReplayBuffer.create(zarr.storage.MemoryStore(), fps=10)
    for n in (5, 9, 13):
        buf.append_episode(make_episode(rng, n))
    sampler = SequenceSampler(ReplayBuffer.load(buf), ["obs/state"], 2, 6)
    ds = WindowDataset(sampler)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False, collate_fn=WindowDataset.collate)
    first = next(iter(loader))
    direct = sampler.gather(np.arange(4))
    for k in direct:
        np.testing.assert_array_equal(first[k].numpy(), direct[k])
    single = ds[2]
    np.testing.assert_array_equal(single["action"].numpy(), direct["action"][2])
    assert first["action"].shape == (4, 6, 3) and first["obs/state"].shape == (4, 2, 5)


def test_split_by_episode():
    train, val = split_episodes(20, 0.2, seed=1)
    assert len(val) == 4 and len(train) == 16
    assert not set(train) & set(val) and set(train) | set(val) == set(range(20))
    assert len(split_episodes(3, 0.01)[1]) == 1  # at least one val episode when asked for any


def test_normalizer_minmax_gaussian_roundtrip(rng):
    x = rng.uniform(-3, 7, (500, 4)).astype(np.float32)
    x[:, 3] = 2.0  # constant dimension
    norm = Normalizer({"a": ((4,), "minmax"), "b": ((4,), "gaussian")}).fit({"a": x, "b": x})
    t = torch.from_numpy(x)
    a = norm.normalize("a", t)
    assert torch.allclose(a[:, :3].min(0).values, torch.tensor(-1.0), atol=1e-5)
    assert torch.allclose(a[:, :3].max(0).values, torch.tensor(1.0), atol=1e-5)
    assert torch.allclose(a[:, 3], torch.tensor(0.0))
    b = norm.normalize("b", t)
    assert torch.allclose(b[:, :3].mean(0), torch.zeros(3), atol=1e-4)
    assert torch.allclose(b[:, :3].std(0, unbiased=False), torch.ones(3), atol=1e-3)
    for k in "ab":
        assert torch.allclose(norm.unnormalize(k, norm.normalize(k, t)), t, atol=1e-4)
    restored = Normalizer({"a": ((4,), "minmax"), "b": ((4,), "gaussian")})
    restored.load_state_dict(norm.state_dict())
    assert torch.equal(restored.normalize("a", t), a)
    with pytest.raises(RuntimeError, match="never fitted"):
        Normalizer({"a": ((4,), "minmax")}).normalize("a", t)
