"""`protege train|eval|collect|inspect`.

Jobs take hydra overrides (`protege train policy=bc task=pointmass train.steps=500`); data tools take
plain arguments (`protege inspect data/push-v3.zarr`). Errors the user caused print one line and
exit with status 2.
"""

from __future__ import annotations

import ctypes.util
import importlib.abc
import os
import re
import shlex
import signal
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

def configure_rendering() -> None:
    """Use software OSMesa for MuJoCo offscreen rendering when it is installed and nothing else was
    chosen. Must run before mujoco is imported; without libOSMesa state-only work still runs."""
    if "MUJOCO_GL" not in os.environ and sys.platform.startswith("linux") and ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    if os.environ.get("MUJOCO_GL") == "osmesa":
        _import_triton_first()
    problem = rendering_problem()
    if problem and "mujoco" not in sys.modules:
        sys.meta_path.insert(0, _RendererGuard(problem))


# MUJOCO_GL backend -> (library it loads, what provides it). mujoco's own import fails without it.
_GL_BACKENDS = {"osmesa": ("OSMesa", "libosmesa6"), "egl": ("EGL", "libegl1"), "glfw": ("glfw", "libglfw3")}
_GL_OFF = ("disable", "disabled", "off", "false", "0")


def rendering_problem() -> str | None:
    """One line naming MUJOCO_GL and what to install when its backend cannot load, else None."""
    value = os.environ.get("MUJOCO_GL", "").strip().lower()
    if not value or value in _GL_OFF or not sys.platform.startswith("linux"):
        return None
    if value not in _GL_BACKENDS:
        return (f"MUJOCO_GL={value} is not a MuJoCo rendering backend; use MUJOCO_GL=osmesa (software rendering: "
                f"apt-get install libosmesa6), egl or glfw, or unset it")
    lib, package = _GL_BACKENDS[value]
    if value == "glfw" or ctypes.util.find_library(lib):  # glfw: the pip package bundles its library
        return None
    return (f"MUJOCO_GL={value} but lib{lib} is not installed: apt-get install {package} "
            f"(or unset MUJOCO_GL; software rendering: MUJOCO_GL=osmesa with libosmesa6)")


class _RendererGuard(importlib.abc.MetaPathFinder):
    """Turns the first `import mujoco` under a broken MUJOCO_GL (which fails inside mujoco's GL
    set-up with a long traceback) into the one-line RenderingError; commands that never touch
    MuJoCo (unknown names, data tools, the point-mass tasks) are unaffected."""

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name == "mujoco":
            from protege.errors import RenderingError

            raise RenderingError(self.problem)
        return None


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


def config_choices(group: str) -> dict[str, str]:
    """Choices of a config group -> their first sentence (the yaml's leading comment)."""
    from protege import CONFIG_DIR

    out = {}
    for p in sorted((CONFIG_DIR / group).glob("*.yaml")):
        comment = []
        for line in p.read_text().splitlines():
            if not line.startswith("#"):
                break
            if "@package" not in line:
                comment.append(line.lstrip("#").strip())
        first = re.split(r"\.\s+(?=[A-Z`(])", " ".join(comment))[0].rstrip(".")  # "et al. 2023" stays whole
        out[p.stem] = first if len(first) <= 110 else first[:107] + "..."
    return out


def _options(group: str) -> list[str]:
    return list(config_choices(group))


def _expand_task(overrides: list[str]) -> list[str]:
    """`task=<name>`: a task yaml, or a variant name (`task=door-open-v3`) -> its yaml + the name."""
    from protege.envs import expand_task

    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        out += expand_task(value) if key == "task" and value else [o]
    return out


def compose(config_name: str, overrides: list[str]) -> Any:
    import hydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from protege import CONFIG_DIR
    from protege.errors import ConfigError
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
        lines = str(e).splitlines()
        hint = next((f" ({ln.strip()})" for ln in lines[1:] if ln.startswith("To append")), "")  # e.g. a new key needs +
        raise ConfigError(f"config {config_name}.yaml: {lines[0]}{hint}") from e


def resume_command(args: list[str], run_dir: str) -> str:
    """The `protege train` command that continues this run (under torchrun: the same launcher
    with these arguments)."""
    keep = [a for a in args if a.partition("=")[0] not in ("run_dir", "resume", "train.stop_at")]
    return shlex.join(["protege", "train", *keep, f"run_dir={run_dir}", "resume=true"])


def cmd_train(args: list[str]) -> int:
    """train [overrides]
    train a policy (default: Diffusion Policy on Meta-World push-v3; collects the demos first if missing),
    evaluate, checkpoint. Overrides are hydra's: group=choice or key=value."""
    from omegaconf import open_dict

    cfg = compose("train", args)  # before the trainer's heavy imports: a bad name fails in a second
    from protege.training.trainer import train

    with open_dict(cfg):
        if cfg.run_dir is None:
            cfg.run_dir = str(Path("runs") / f"{cfg.task.name}-{cfg.policy.name}-{datetime.now():%Y%m%d-%H%M%S}")
    result = train(cfg)
    print(f"run dir: {result['run_dir']}")
    print(f"checkpoint: {result['checkpoint']}")
    if result["interrupted"]:
        if os.environ.get("RANK", "0") == "0":
            print(f"stopped at step {result['step']} ({signal.Signals(result['interrupted']).name}); continue with:\n"
                  f"  {resume_command(args, result['run_dir'])}", flush=True)
        return 128 + result["interrupted"]
    if "eval" in result:
        ev = result["eval"]
        if "video" in ev:
            print(f"video: {ev['video']}")
        print(f"eval.json: {Path(result['run_dir']) / 'eval.json'}")
        print(f"success_rate={ev['success_rate']:.3f} n_episodes={ev['n_episodes']}")
    return 0


def cmd_eval(args: list[str]) -> int:
    """eval checkpoint=<dir> [out=<json>] [overrides]
    roll a checkpoint out; prints success_rate=<x>, writes eval.json. Overrides apply to the
    checkpoint's config (eval.n_episodes=100, policy.num_inference_steps=1, ...)."""
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
    policy = ckpt.load_policy(ckpt_dir, cfg, device=select_device(cfg.device), runtime=cfg.eval.get("runtime", "auto"))
    # a checkpoint under <run>/checkpoints/step_N reports into <run>; a loose checkpoint into itself
    run_dir = ckpt_dir.parent.parent if ckpt_dir.parent.name == "checkpoints" else ckpt_dir
    out_json = Path(out) if out else run_dir / "eval.json"
    summary = run_eval(cfg, policy, out_json, video=cfg.eval.video)
    print(f"eval.json: {out_json}")
    if "video" in summary:
        print(f"video: {summary['video']}")
    print(f"success_rate={summary['success_rate']:.3f} n_episodes={summary['n_episodes']} mean_length={summary['mean_length']:.1f}")
    return 0


def _dash_options(args: list[str], names: dict[str, str]) -> list[str]:
    """`--image-codec png` / `--image-codec=png` -> the hydra override `image_codec=png`, so jobs
    take the same options as `protege convert`."""
    out, it = [], iter(args)
    for a in it:
        flag, eq, value = a.partition("=")
        if flag in names:
            if not eq:
                value = next(it, None)
                if value is None:
                    from protege.errors import ConfigError

                    raise ConfigError(f"{flag}: expected a value")
            out.append(f"{names[flag]}={value}")
        else:
            out.append(a)
    return out


def cmd_collect(args: list[str]) -> int:
    """collect task=<name> n_episodes=N out=<buffer> [--image-codec jpeg[:Q]|png|raw] [--resize HxW]
    scripted-expert demonstrations -> replay buffer (resumable); camera frames stored as jpeg:95 by default."""
    from omegaconf import OmegaConf

    from protege.envs.collect import collect

    from protege.datasets.frames import ImageStorage

    cfg = compose("collect", _dash_options(args, {"--image-codec": "image_codec", "--resize": "resize"}))
    storage = ImageStorage.parse(cfg.image_codec, cfg.resize)
    buf = collect(cfg.task.env_id, OmegaConf.to_container(cfg.task.env, resolve=True), int(cfg.n_episodes), cfg.out,
                  fps=cfg.task.fps, seed=int(cfg.seed), only_success=cfg.only_success, image_storage=storage)
    print(buf.summary())
    return 0


def cmd_inspect(args: list[str]) -> int:
    """inspect <buffer>
    episodes, keys, shapes, dtypes, fps, frame codec, instructions (with step counts) and robomimic filter keys."""
    from protege.datasets.replay_buffer import ReplayBuffer
    from protege.errors import ConfigError

    if len(args) != 1:
        raise ConfigError("usage: protege inspect <buffer>")
    print(ReplayBuffer.open(args[0]).summary(stats=True))
    return 0


def cmd_convert(args: list[str]) -> int:
    """convert <src> <out> [--format F] [--to F] [--image-codec jpeg[:Q]|png|raw] [--resize HxW]
    dataset -> replay buffer (resumable); --to exports a replay buffer to another format."""
    import argparse

    from protege.datasets.adapters import EXPORT_NAMES, FORMATS, convert, export
    from protege.errors import ConfigError

    formats = "; ".join(f"{n}: {f.summary}" for n, f in FORMATS.items())
    p = argparse.ArgumentParser(prog="protege convert", description="dataset -> replay buffer (resumable); "
                                f"--to {'|'.join(EXPORT_NAMES)} exports a buffer. Formats: {formats}")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", choices=list(FORMATS), help="source format (default: detected)")
    p.add_argument("--to", choices=["protege", *EXPORT_NAMES], default="protege", help="output format")
    p.add_argument("--fps", type=float, help="control rate, when the source does not record it")
    p.add_argument("--map", action="append", default=[], metavar="KEY=SRC", help="npz: buffer key = npz key (repeatable)")
    p.add_argument("--image-codec", metavar="jpeg[:Q]|png|raw", help="how camera frames are stored (default jpeg:95)")
    p.add_argument("--resize", metavar="HxW", help="resize camera frames when writing, e.g. 240x320")
    try:
        a = p.parse_args(args)
    except SystemExit as e:
        if e.code == 0:
            return 0
        raise ConfigError("bad arguments (see protege convert --help)") from e
    if a.to != "protege":  # export a replay buffer
        from protege.datasets.replay_buffer import ReplayBuffer

        print(f"wrote {export(ReplayBuffer.open(a.src), a.to, a.out)}")
        return 0
    options = {}
    if a.fps:
        options["fps"] = a.fps
    if a.map:
        options["key_map"] = dict(m.split("=", 1) for m in a.map)
    from protege.datasets.frames import ImageStorage

    storage = ImageStorage.parse(a.image_codec, a.resize)
    print(convert(a.src, a.out, a.format, image_storage=storage, **options).summary())
    return 0


def cmd_validate(args: list[str]) -> int:
    """validate <buffer>
    read every value: layout, lengths, finite numbers."""
    from protege.datasets.replay_buffer import ReplayBuffer
    from protege.errors import ConfigError

    if len(args) != 1:
        raise ConfigError("usage: protege validate <buffer>")
    buf = ReplayBuffer.open(args[0])
    buf.validate_data()
    print(f"{args[0]}: valid ({buf.n_episodes} episodes, {buf.n_steps} steps, keys {buf.keys()})")
    return 0


def cmd_run(args: list[str]) -> int:
    """run checkpoint=<dir> hardware=<name> [runner.key=value ...]
    drive a robot with a policy at its control rate; records every step, prints timing; the exit code
    says how it ended."""
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
    """record hardware=<name> teleop=<keyboard|spacemouse|replay> out=<buffer> [task=<name>]
    teleoperated demonstrations through the controller and safety layer -> a crash-safe replay buffer."""
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


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "collect": cmd_collect, "inspect": cmd_inspect,
            "convert": cmd_convert, "validate": cmd_validate, "run": cmd_run, "record": cmd_record}


def _group_choices(group: str) -> str:
    lines = [f"  {name:26}{summary}" for name, summary in config_choices(group).items()]
    if group == "task":
        from protege.envs import ENVS

        lines += [f"  {'':26}or {s.variants.example}" for s in ENVS.values() if s.variants]
    return "\n".join(lines)


def _config_help(config_name: str, section: str | None = None) -> str:
    """The config groups of `<config_name>.yaml` with their choices, and its keys (or only those
    under `section`) with their defaults."""
    from omegaconf import OmegaConf

    from protege import CONFIG_DIR

    cfg = OmegaConf.load(CONFIG_DIR / f"{config_name}.yaml")
    out = []
    for entry in cfg.get("defaults", []):
        if OmegaConf.is_dict(entry):  # `- group: default` (not `- _self_`)
            ((group, default),) = entry.items()
            if not config_choices(group):  # a group registered in code (runner: RunnerSettings), no yamls
                node = compose(config_name, [])[group]
                out.append(f"{group} options ({group}.key=value):\n" + "\n".join(
                    f"  {group}.{k}={v}" for k, v in _flat(OmegaConf.to_container(node))))
                continue
            fixed = " (set by the checkpoint; override its keys, e.g. policy.num_inference_steps=1)" if section else ""
            out.append(f"{group}=<choice> (default {default}){fixed}:\n{_group_choices(group)}")
    body = OmegaConf.masked_copy(cfg, [section]) if section else cfg
    keys = [f"  {k}={v}" for k, v in _flat(OmegaConf.to_container(body)) if k != "defaults"]
    return "\n\n".join(out + ["options (key=value; nested keys with dots):\n" + "\n".join(keys)])


def _flat(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        items += _flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]
    return items


def command_help(name: str) -> str:
    """`protege <name> --help`: usage line, description and, for config-driven commands, config groups/keys."""
    usage, _, desc = (COMMANDS[name].__doc__ or name).partition("\n")
    text = f"usage: protege {usage}\n\n" + "\n".join(line.strip() for line in desc.strip().splitlines())
    config = {"train": ("train", None), "eval": ("train", "eval"), "collect": ("collect", None), "run": ("run", None),
              "record": ("record", None)}
    if name in config:
        text += "\n\n" + _config_help(*config[name])
    return text


def usage() -> str:
    """Top-level usage, read from the command docstrings and the task/policy registries."""
    from protege.envs import ENVS

    lines = ["usage: protege <command> [args]   (protege <command> --help: its options)", "", "commands:"]
    for doc in (f.__doc__ or "" for f in COMMANDS.values()):
        usage_line, _, desc = doc.partition("\n")
        lines += [f"  {usage_line}", f"      {' '.join(desc.split()).split('. ')[0].rstrip('.')}"]
    variants = "".join(f", or {s.variants.example}" for s in ENVS.values() if s.variants)
    lines += ["", f"tasks:    {', '.join(config_choices('task'))}{variants}",
              f"policies: {', '.join(config_choices('policy'))}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"protege: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if argv[0] != "convert" and any(a in ("-h", "--help") for a in argv[1:]):  # convert: argparse's own help
        print(command_help(argv[0]))
        return 0
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
