"""The pure parts of scripts/experiments/robomimic_peer.py: robomimic's BC-RNN config as its paper-config
generator builds it (with only the documented adjustments) and the parsing of robomimic's training log."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "experiments" / "robomimic_peer.py"


@pytest.fixture(scope="module")
def peer():
    spec = importlib.util.spec_from_file_location("robomimic_peer", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bc_rnn_config_is_robomimics_with_only_the_stated_adjustments(peer, tmp_path):
    pytest.importorskip("robomimic", reason="robomimic is installed by scripts/setup.sh")
    c = peer.bc_rnn_config("robomimic_lift", tmp_path / "d.hdf5", tmp_path / "out", epochs=7, rollouts=3, seed=5)
    # robomimic's BC-RNN (low-dim ph) hyper-parameters
    assert c.algo_name == "bc" and c.algo.rnn.enabled and c.algo.rnn.horizon == 10 and c.train.seq_length == 10
    assert c.algo.rnn.hidden_dim == 400 and c.algo.rnn.num_layers == 2 and c.algo.gmm.enabled
    assert tuple(c.algo.actor_layer_dims) == () and c.algo.optim_params.policy.learning_rate.initial == 1e-4
    assert c.train.batch_size == 100 and c.experiment.epoch_every_n_steps == 100
    assert list(c.observation.modalities.obs.low_dim) == ["robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos", "object"]
    assert c.experiment.rollout.horizon == 400 and c.experiment.rollout.terminate_on_success
    # the adjustments
    assert c.train.data == str(tmp_path / "d.hdf5") and c.train.output_dir == str(tmp_path / "out")
    assert c.train.num_epochs == 7 and c.experiment.rollout.n == 3 and c.experiment.rollout.rate == 7
    assert c.train.seed == 5 and not c.experiment.validate and c.train.hdf5_filter_key is None
    assert c.train.hdf5_validation_filter_key is None
    with pytest.raises(ValueError, match="robomimic_lift"):
        peer.bc_rnn_config("pointmass", "d.hdf5", "out", 1, 1)


def test_no_gmm_config_differs_only_in_the_gmm_and_builds_robomimics_plain_bc_rnn(peer, tmp_path):
    """--no-gmm: the one declared deviation. Every other value equals the "ph" config, and robomimic's own
    algo factory then picks its deterministic BC_RNN (L2 loss) instead of BC_RNN_GMM."""
    pytest.importorskip("robomimic", reason="robomimic is installed by scripts/setup.sh")
    from robomimic.algo.algo import REGISTERED_ALGO_FACTORY_FUNCS
    from robomimic.algo.bc import BC_RNN, BC_RNN_GMM

    algo_config_to_class = REGISTERED_ALGO_FACTORY_FUNCS["bc"]  # what robomimic's algo_factory calls

    args = ("robomimic_lift", tmp_path / "d.hdf5", tmp_path / "out")
    ph = peer.bc_rnn_config(*args, epochs=3, rollouts=2)
    off = peer.bc_rnn_config(*args, epochs=3, rollouts=2, gmm=False)

    def flat(d, prefix=""):
        for k, v in d.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, dict) else [(f"{prefix}{k}", v)]

    diff = {k for (k, v), (k2, v2) in zip(flat(ph.to_dict()), flat(off.to_dict()), strict=True) if (k, v) != (k2, v2)}
    assert diff == {"algo.gmm.enabled"}
    assert algo_config_to_class(off.algo)[0] is BC_RNN and off.algo.loss.l2_weight == 1.0
    assert algo_config_to_class(ph.algo)[0] is BC_RNN_GMM


def _robomimic_stdout(epochs, rollout=None, tail="finished run successfully!"):
    """Text in the shape robomimic's train.py prints (json.dumps(..., indent=4) blocks), with tqdm noise."""
    out = ["============= New Training Run with Config =============", "{\n    \"algo_name\": \"bc\"\n}"]
    for i, (loss, minutes) in enumerate(epochs, 1):
        out.append(f"100%|##########| 100/100 [00:03<00:00, 30.1it/s]\nTrain Epoch {i}")
        out.append(json.dumps({"Loss": loss, "Log_Likelihood": -loss, "Time_Epoch": minutes, "Time_Train_Batch": minutes * 0.9,
                               "Policy_Grad_Norms": 1.0}, sort_keys=True, indent=4))
        out.append(f"\nEpoch {i} Memory Usage: 900 MB\n")
    if rollout is not None:
        out.insert(-1, f"\nEpoch {len(epochs)} Rollouts took 4.5s (avg) with results:\nEnv: Lift\n"
                   + json.dumps(rollout, sort_keys=True, indent=4))
    out.append(tail)
    return "\n".join(out)


def test_parse_robomimic_log_and_summary(peer, tmp_path):
    pytest.importorskip("robomimic", reason="robomimic is installed by scripts/setup.sh")
    rollout = {"Horizon": 60.5, "Return": 0.9, "Success_Rate": 0.9, "Time_Episode": 0.75, "time": 4.5}
    log = peer.parse_robomimic_log(_robomimic_stdout([(1.5, 0.05), (0.5, 0.05)], rollout))
    assert sorted(log["epochs"]) == [1, 2] and log["epochs"][2]["Loss"] == 0.5
    assert log["rollouts"] == [{"epoch": 2, "env": "Lift", **rollout}]
    c = peer.bc_rnn_config("robomimic_lift", tmp_path / "d.hdf5", tmp_path / "out", epochs=2, rollouts=10)
    s = peer.summarize_bc_rnn(log, c)
    assert s["steps"] == 200 and s["train_time_s"] == pytest.approx(6.0) and s["samples_per_s"] == pytest.approx(200 * 100 / 6.0)
    assert s["success_rate"] == 0.9 and s["n_episodes"] == 10 and s["eval_wall_s"] == pytest.approx(45.0)


def test_parse_robomimic_log_failures_are_clear(peer):
    with pytest.raises(peer.RobomimicRunError, match="KeyError: 'obs'"):
        peer.parse_robomimic_log(_robomimic_stdout([(1.0, 0.1)], tail="run failed with error:\nKeyError: 'obs'\n\nTraceback"))
    with pytest.raises(peer.RobomimicRunError, match="no 'Train Epoch'"):
        peer.parse_robomimic_log("============= New Training Run with Config =============\n")
    with pytest.raises(peer.RobomimicRunError, match="after epoch 1"):
        peer.parse_robomimic_log(_robomimic_stdout([(1.0, 0.1)], tail="Killed"))
