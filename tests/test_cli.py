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


def test_help_reads_the_registries(capsys):
    from protege.datasets.adapters import EXPORT_NAMES, FORMATS
    from protege.envs import ENVS

    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "pointmass_bimodal" in out and "Meta-World v3 name" in out and "validate <buffer>" in out
    rc, out, _ = run(capsys, "train", "--help")
    assert rc == 0 and "task=<choice> (default metaworld)" in out and "policy=<choice> (default diffusion)" in out
    assert "  bc " in out and "  franka_push " in out and "train.steps=4000" in out
    rc, out, _ = run(capsys, "eval", "--help")
    assert rc == 0 and "checkpoint=<dir>" in out and "eval.n_episodes=50" in out and "  diffusion " in out
    rc, out, _ = run(capsys, "convert", "--help")  # argparse's help: every format and exporter from the registry
    assert rc == 0 and all(name in out for name in FORMATS) and f"{{protege,{','.join(EXPORT_NAMES)}}}" in out
    # every task yaml names a registered env, and every registered env class and expert exists
    from protege.cli import compose, config_choices

    for name in config_choices("task"):
        assert compose("collect", [f"task={name}"]).task.env_id in ENVS, name
    import importlib

    for spec in ENVS.values():
        module = importlib.import_module(spec.module)
        assert callable(getattr(module, spec.env)) and callable(getattr(module, spec.expert))


def test_rendering_problem_names_the_variable_and_the_package(monkeypatch):
    import ctypes.util

    from protege.cli import rendering_problem

    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    assert "MUJOCO_GL=osmesa" in rendering_problem() and "libosmesa6" in rendering_problem()
    monkeypatch.setenv("MUJOCO_GL", "egl")
    assert "MUJOCO_GL=egl" in rendering_problem() and "libegl1" in rendering_problem()
    monkeypatch.setenv("MUJOCO_GL", "disable")
    assert rendering_problem() is None


def test_broken_mujoco_gl_one_line_and_no_renderer_where_none_is_needed(tmp_path):
    """A new user's MUJOCO_GL pointing at a backend that cannot load: name errors and MuJoCo-free
    commands work as usual; a MuJoCo task gets one line naming the variable and the package."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MUJOCO_GL": "bogus", "PYTHONPATH": os.pathsep.join(sys.path)}

    def protege(*args):
        return subprocess.run([sys.executable, "-m", "protege.cli", *args], env=env, capture_output=True, text=True,
                              timeout=120, cwd=tmp_path)

    r = protege("train", "task=no_such_task")
    assert r.returncode == 2 and "unknown task 'no_such_task'" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = protege("collect", "task=push-v3", "n_episodes=1", "out=mw.zarr")
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "MUJOCO_GL=bogus" in r.stderr and "libosmesa6" in r.stderr
    r = protege("collect", "task=pointmass", "n_episodes=2", "out=pm.zarr")  # no MuJoCo: unaffected
    assert r.returncode == 0 and "episodes: 2" in r.stdout, r.stderr
