import json

import pytest

from protege.cli import main


def run(capsys, *args):
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "task=pointmas"], "unknown task 'pointmas'"),
        (["train", "policy=difusion"], "unknown policy 'difusion'"),
        (["train", "train.stepz=3"], "stepz"),
        (["train", "steps"], "expected key=value"),
        (["collect", "task=door-opn-v3"], "unknown task"),
        (["inspect", "/definitely/not/here.zarr"], "/definitely/not/here.zarr"),
        (["eval", "checkpoint=/definitely/not/here"], "/definitely/not/here"),
        (["eval"], "checkpoint="),
    ],
)
def test_user_errors_are_one_clear_line(capsys, args, needle):
    rc, out, err = run(capsys, *args)
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_inspect_a_directory_that_is_not_a_buffer(capsys, tmp_path):
    rc, _, err = run(capsys, "inspect", str(tmp_path))
    assert rc == 2 and str(tmp_path) in err and "expected" in err


def test_collect_inspect_train_eval(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out, _ = run(capsys, "collect", "task=pointmass", "n_episodes=12", "out=pm.zarr")
    assert rc == 0 and "episodes: 12" in out
    rc, out, _ = run(capsys, "inspect", "pm.zarr")
    assert rc == 0
    for needle in ("episodes: 12", "obs/state", "float32", "fps: 10", "action"):
        assert needle in out
    # resumable: asking for more adds only the missing episodes
    rc, out, _ = run(capsys, "collect", "task=pointmass", "n_episodes=15", "out=pm.zarr")
    assert "episodes: 15" in out
    rc, _, err = run(capsys, "train", "task=pointmass", "dataset=pm.zarr", "task.obs_keys=[obs/stat]", "run_dir=bad")
    assert rc == 2 and "pm.zarr" in err and "obs/stat" in err and "did you mean 'obs/state'" in err
    assert not (tmp_path / "bad").exists()  # nothing written for a bad config
    rc, out, _ = run(capsys, "train", "task=pointmass", "policy=bc", "dataset=pm.zarr", "train.steps=30",
                     "eval.n_episodes=4", "run_dir=run", "train.val_every=10")
    assert rc == 0 and "success_rate=" in out
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["n_episodes"] == 4
    assert (tmp_path / "run" / "eval.mp4").stat().st_size > 0  # point mass renders without GL
    assert list((tmp_path / "run" / "tb").iterdir())
    rc, out, _ = run(capsys, "eval", "checkpoint=run", "eval.n_episodes=6", "eval.video=false")
    assert rc == 0 and "success_rate=" in out
    summary = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert summary["n_episodes"] == 6 and 0.0 <= summary["success_rate"] <= 1.0
    assert len(summary["episodes"]) == 6


def test_collect_metaworld_by_name(capsys, tmp_path):
    rc, out, _ = run(capsys, "collect", "task=reach-v3", "n_episodes=2", f"out={tmp_path / 'reach.zarr'}")
    assert rc == 0 and "episodes: 2" in out and "(39,)" not in out and "39)" in out
