"""`protege train|eval|collect|inspect`.

Jobs take hydra overrides (`protege train policy=bc task=pointmass train.steps=500`); data tools take
plain arguments (`protege inspect data/push-v3.zarr`). Errors the user caused print one line and
exit with status 2.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

USAGE = """usage: protege <command> [args]

commands:
  train   [overrides]                       train a policy (default: Diffusion Policy on Meta-World push-v3;
                                            collects the demos first if missing), evaluate, checkpoint
  eval    checkpoint=<dir> [overrides]      roll a checkpoint out; prints success_rate=<x>, writes eval.json
  collect task=<name> n_episodes=N out=<p>  scripted-expert demonstrations -> replay buffer
  inspect <buffer>                          episodes, keys, shapes, dtypes, fps of a replay buffer
  convert <src> <out> [--format F]          LeRobot v2.1/v3 / robomimic / ALOHA hdf5 / npz folder -> replay buffer
                                            (resumable); --to lerobot|robomimic exports a buffer
  validate <buffer>                         read every value: layout, lengths, finite numbers
  run     checkpoint=<dir> hardware=<name>  drive a robot (mujoco, mujoco_fast, franka, aloha_mujoco) with a policy at its
          [runner.key=value ...]            control rate; records every step; prints timing; exit code says how it ended
  record  hardware=<name> teleop=<device>   teleoperated demonstrations (keyboard, spacemouse, replay) -> replay buffer
          out=<buffer> [task=<name>]

tasks: pointmass, pointmass_bimodal, pointmass_image, metaworld (push-v3), or any Meta-World v3 name (task=door-open-v3),
       aloha_transfer_cube, aloha_insertion (bimanual, camera `top`; *_state: state-only),
       franka_reach, franka_push, franka_pick_place (MuJoCo Panda)
policies: diffusion, diffusion_paper, diffusion_image, bc, act, act_small, beso, idm_bc, idm_diffusion, vla
stages:   pretrain=idm (inverse-dynamics encoder pretraining; fine-tune with policy.obs_encoder.checkpoint=<run>)
"""


def configure_rendering() -> None:
    """Use software OSMesa for MuJoCo offscreen rendering when it is installed and nothing else was
    chosen. Must run before mujoco is imported; without libOSMesa state-only work still runs."""
    if "MUJOCO_GL" not in os.environ and sys.platform.startswith("linux") and ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    if os.environ.get("MUJOCO_GL") == "osmesa":
        _import_triton_first()


def _import_triton_first() -> None:
    """PyOpenGL loads libOSMesa with RTLD_GLOBAL, which puts Mesa's LLVM into the global symbol scope:
    importing triton after a first frame was rendered (torch._dynamo imports it, e.g. via diffusers
    when `protege train` builds a policy after collecting camera demos) then segfaults. Loaded
    first (~0.1 s), triton keeps its own LLVM and rendering is unchanged."""
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        try:
            import triton  # noqa: F401
        except Exception:  # noqa: BLE001 - a broken triton install must not stop state-only work
            pass


def _options(group: str) -> list[str]:
    from protege.policies.base import CONFIG_DIR

    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _expand_task(overrides: list[str]) -> list[str]:
    """`task=<meta-world name>` -> `task=metaworld task.env.task=<name>` (no yaml per Meta-World task)."""
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key == "task" and value and value not in _options("task"):
            from protege.envs.metaworld import task_names

            if value in task_names():
                out += ["task=metaworld", f"task.env.task={value}"]
                continue
            from protege.errors import ConfigError

            raise ConfigError(f"unknown task {value!r}; expected one of {_options('task')} or a Meta-World v3 name "
                              f"(e.g. {', '.join(task_names()[:4])}, ...)")
        out.append(o)
    return out


def compose(config_name: str, overrides: list[str]) -> Any:
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from protege.errors import ConfigError
    from protege.policies.base import CONFIG_DIR
    from protege.runtime.settings import register_configs

    register_configs()  # runner/default comes from RunnerSettings, not a yaml
    overrides = _expand_task(overrides)
    for o in overrides:
        key, eq, value = o.partition("=")
        if not eq:
            raise ConfigError(f"override {o!r}: expected key=value")
        if key in ("task", "policy") and value not in _options(key):
            raise ConfigError(f"unknown {key} {value!r}; expected one of {_options(key)}")
    try:
        with hydra.initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return hydra.compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"config {config_name}.yaml: {str(e).splitlines()[0]}") from e


def cmd_train(args: list[str]) -> int:
    from omegaconf import open_dict

    from protege.training.trainer import train

    cfg = compose("train", args)
    with open_dict(cfg):
        if cfg.run_dir is None:
            cfg.run_dir = str(Path("runs") / f"{cfg.task.name}-{cfg.policy.name}-{datetime.now():%Y%m%d-%H%M%S}")
    result = train(cfg)
    print(f"run dir: {result['run_dir']}")
    print(f"checkpoint: {result['checkpoint']}")
    if "eval" in result:
        ev = result["eval"]
        if "video" in ev:
            print(f"video: {ev['video']}")
        print(f"eval.json: {Path(result['run_dir']) / 'eval.json'}")
        print(f"success_rate={ev['success_rate']:.3f} n_episodes={ev['n_episodes']}")
    return 0


def cmd_eval(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from protege.errors import ConfigError
    from protege.training import checkpoint as ckpt
    from protege.training.trainer import run_eval, select_device

    kv = dict(a.partition("=")[::2] for a in args)
    if "checkpoint" not in kv:
        raise ConfigError("protege eval: expected checkpoint=<checkpoint or run dir>")
    ckpt_dir = ckpt.resolve_checkpoint(kv.pop("checkpoint"))
    out = kv.pop("out", None)
    cfg = ckpt.load_config(ckpt_dir)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{k}={v}" for k, v in kv.items()]))
    except Exception as e:  # noqa: BLE001 - omegaconf raises several types for bad dotlists
        raise ConfigError(f"protege eval: bad override: {e}") from e
    policy = ckpt.load_policy(ckpt_dir, cfg, device=select_device(cfg.device))
    # a checkpoint under <run>/checkpoints/step_N reports into <run>; a loose checkpoint into itself
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir
    out_json = Path(out) if out else run_dir / "eval.json"
    summary = run_eval(cfg, policy, out_json, video=cfg.eval.video)
    print(f"eval.json: {out_json}")
    if "video" in summary:
        print(f"video: {summary['video']}")
    print(f"success_rate={summary['success_rate']:.3f} n_episodes={summary['n_episodes']} mean_length={summary['mean_length']:.1f}")
    return 0


def cmd_collect(args: list[str]) -> int:
    from omegaconf import OmegaConf

    from protege.envs.collect import collect

    cfg = compose("collect", args)
    buf = collect(cfg.task.env_id, OmegaConf.to_container(cfg.task.env, resolve=True), int(cfg.n_episodes), cfg.out,
                  fps=cfg.task.fps, seed=int(cfg.seed), only_success=cfg.only_success)
    print(buf.summary())
    return 0


def cmd_inspect(args: list[str]) -> int:
    from protege.datasets.replay_buffer import ReplayBuffer
    from protege.errors import ConfigError

    if len(args) != 1:
        raise ConfigError("usage: protege inspect <buffer>")
    print(ReplayBuffer.open(args[0]).summary(stats=True))
    return 0


def cmd_convert(args: list[str]) -> int:
    import argparse

    from protege.datasets.adapters import FORMAT_NAMES, convert
    from protege.errors import ConfigError

    p = argparse.ArgumentParser(prog="protege convert", description="dataset -> replay buffer (resumable); "
                                "--to robomimic|lerobot exports a buffer")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", choices=FORMAT_NAMES, help="source format (default: detected)")
    p.add_argument("--to", choices=["protege", "robomimic", "lerobot"], default="protege", help="output format")
    p.add_argument("--fps", type=float, help="control rate, when the source does not record it")
    p.add_argument("--map", action="append", default=[], metavar="KEY=SRC", help="npz: buffer key = npz key (repeatable)")
    try:
        a = p.parse_args(args)
    except SystemExit as e:
        if e.code == 0:
            return 0
        raise ConfigError("bad arguments (see protege convert --help)") from e
    if a.to != "protege":  # export a replay buffer
        from protege.datasets.adapters import lerobot, robomimic
        from protege.datasets.replay_buffer import ReplayBuffer

        exporter = {"robomimic": robomimic.export, "lerobot": lerobot.export}[a.to]
        print(f"wrote {exporter(ReplayBuffer.open(a.src), a.out)}")
        return 0
    options = {}
    if a.fps:
        options["fps"] = a.fps
    if a.map:
        options["key_map"] = dict(m.split("=", 1) for m in a.map)
    print(convert(a.src, a.out, a.format, **options).summary())
    return 0


def cmd_validate(args: list[str]) -> int:
    from protege.datasets.replay_buffer import ReplayBuffer
    from protege.errors import ConfigError

    if len(args) != 1:
        raise ConfigError("usage: protege validate <buffer>")
    buf = ReplayBuffer.open(args[0])
    buf.validate_data()
    print(f"{args[0]}: valid ({buf.n_episodes} episodes, {buf.n_steps} steps, keys {buf.keys()})")
    return 0


def cmd_run(args: list[str]) -> int:
    import logging

    from protege.runtime.runner import format_report, run_checkpoint

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("protege.runtime").setLevel(logging.INFO)
    for o in args:
        if o.startswith("hardware=") and o.partition("=")[2] not in _options("hardware"):
            from protege.errors import ConfigError

            raise ConfigError(f"unknown hardware {o.partition('=')[2]!r}; expected one of {_options('hardware')}")
    report = run_checkpoint(compose("run", args))
    print(format_report(report))
    return int(report["exit_code"])


def cmd_record(args: list[str]) -> int:
    import logging

    from protege.runtime.record import record_from_config

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("protege.runtime").setLevel(logging.INFO)
    for o in args:
        group, _, value = o.partition("=")
        if group in ("hardware", "teleop") and value not in _options(group):
            from protege.errors import ConfigError

            raise ConfigError(f"unknown {group} {value!r}; expected one of {_options(group)}")
    r = record_from_config(compose("record", args))
    print(f"record: {r['saved']} episode(s) saved, {r['discarded']} discarded, {r['steps']} steps; "
          f"{r['episodes_in_buffer']} episode(s) in {r['out']}; safety interventions: {r['safety_interventions'] or 'none'}")
    return 0


COMMANDS = {"run": cmd_run, "record": cmd_record, "train": cmd_train, "eval": cmd_eval, "collect": cmd_collect, "inspect": cmd_inspect,
            "convert": cmd_convert, "validate": cmd_validate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if argv[0] not in COMMANDS:
        print(f"protege: unknown command {argv[0]!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    configure_rendering()
    from protege.errors import ProtegeError

    try:
        return COMMANDS[argv[0]](argv[1:])
    except ProtegeError as e:
        print(f"protege {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"protege {argv[0]}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
