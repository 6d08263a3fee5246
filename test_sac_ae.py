"""sac_ae.py's specification as tests: one behaviour per test, the real dm_control where cheap.

python -m pytest -q test_sac_ae.py                 # everything, a few minutes on 2 cores
python -m pytest -q test_sac_ae.py -m "not slow"   # without the runs in real processes
"""

import collections
import contextlib
import copy
import csv
import functools
import hashlib
import inspect
import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import sac_ae

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sac_ae.py")
pytest_plugins = [__name__]  # this module is its own plugin: it registers the `slow` marker


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: whole runs and compilation; -m 'not slow' skips them")


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if getattr(getattr(item, "function", None), "slow", False):
            item.add_marker("slow")


def slow(test):
    test.slow = True
    return test


# ---------------------------------------------------------------------------- shared set-up
def without(argv, *flags):
    """argv less these flags and their values."""
    argv = list(argv)
    for flag in flags:
        while flag in argv:
            del argv[argv.index(flag) : argv.index(flag) + 2]
    return argv


def with_flag(argv, flag, value):
    """argv with flag's value replaced (or the flag added)."""
    if flag in argv:
        i = argv.index(flag)
        return [*argv[:i], flag, value, *argv[i + 2 :]]
    return [*argv, flag, value]


CONV_FLAGS = ("--image-size", "--num-filters", "--num-conv-layers", "--feature-dim")


def small_args(*extra):
    """Resolved arguments with tiny networks, for tests of the maths."""
    argv = ["--image-size", "32", "--hidden-dim", "32", "--feature-dim", "8", "--num-filters", "4",
            "--batch-size", "4", *extra]  # fmt: skip
    return sac_ae.parse_args(without(argv, *CONV_FLAGS) if "state" in extra else argv)


def make_agent(*extra, action_dim=3, seed=0, device="cpu", cls=sac_ae.SACAE):
    torch.manual_seed(seed)  # the same initial weights in every run of a test (made on the CPU)
    args = small_args(*extra)
    size = args.image_size
    obs_shape = (3 * args.frame_stack, size, size) if args.obs == "pixels" else (5,)
    return cls(obs_shape, action_dim, sac_ae.pick_device(device), args), args


def random_batch(agent, args, batch=4, action_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3 * args.frame_stack, args.image_size, args.image_size)
    obs = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    next_obs = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    action = torch.rand(batch, action_dim, generator=g) * 2 - 1
    return obs, action, torch.rand(batch, 1, generator=g), next_obs, torch.ones(batch, 1)


def state_batch(batch, state_dim, action_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, state_dim, generator=g),
            torch.rand(batch, action_dim, generator=g) * 2 - 1, torch.rand(batch, 1, generator=g),
            torch.randn(batch, state_dim, generator=g), torch.ones(batch, 1))  # fmt: skip


def features(agent, obs):
    """Conv features of uint8 pixels, as update() computes them."""
    return agent.encoder(agent.prepare(obs))


def snapshot(params):
    return [p.detach().clone() for p in params]


def same(before, params):
    return all(torch.equal(a, b.detach()) for a, b in zip(before, params))


def agent_state(agent):
    return {name: p.detach() for name, p in agent.named_parameters()}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def only_line(stderr):
    """The whole of stderr is one error line: no traceback, nothing printed after it."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sac_ae.py: error: "), stderr
    return lines[0]


def one_line_error(capsys):
    return only_line(capsys.readouterr().err)


def exit_code(argv):
    """main(argv) in this process: what it returns (--help would exit)."""
    return sac_ae.main(argv)


def replay(shape, dtype, capacity, episode_length, k=3, action_dim=1, **kw):
    return sac_ae.ReplayBuffer(shape, dtype, k, action_dim, capacity, episode_length, **kw)


TINY_RUN = ["--domain", "cartpole", "--task", "swingup", "--seed", "2", "--total-steps", "600",
            "--init-steps", "30", "--eval-freq", "400", "--eval-episodes", "1",
            "--checkpoint-freq", "200", "--batch-size", "8", "--image-size", "32",
            "--hidden-dim", "32", "--num-filters", "8", "--device", "cpu"]  # fmt: skip
STATE_RUN = [*without(TINY_RUN, *CONV_FLAGS), "--obs", "state"]  # renders nothing


def tiny_run(out, *extra, code=0, **flags):
    """TINY_RUN (with flags replaced: total_steps=400, obs="state") into `out`, in this process.
    A state run renders nothing: the tests of faults that pixels do not change use one."""
    argv = STATE_RUN if flags.get("obs") == "state" else TINY_RUN
    for name, value in flags.items():
        argv = with_flag(argv, "--" + name.replace("_", "-"), str(value))
    assert sac_ae.main([*argv, *extra, "--out-dir", str(out)]) == code
    return out


def resume(out, *extra, code=0):
    assert sac_ae.main(["--resume", str(out), *extra]) == code
    return out


def logged_rows(run_dir):
    """eval.csv and train.csv without their wall-clock columns."""
    out = {}
    for name in ("eval.csv", "train.csv"):
        rows = read_csv(run_dir / name)
        out[name] = [{k: v for k, v in r.items() if k not in ("wall_time", "fps")} for r in rows]
    return out


def assert_same_weights(a, b):
    wa = torch.load(a / "model.pt", weights_only=True)["agent"]
    wb = torch.load(b / "model.pt", weights_only=True)["agent"]
    assert wa.keys() == wb.keys()
    for name, value in wa.items():
        assert torch.equal(value, wb[name]), name


def assert_same_run(a, b):
    assert logged_rows(a) == logged_rows(b)
    assert_same_weights(a, b)


def tensorboard_steps(run_dir):
    """The steps of each TensorBoard scalar, as TensorBoard shows them (purged events gone)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(run_dir / "tb")).Reload()
    return {tag: [e.step for e in tb.Scalars(tag)] for tag in tb.Tags()["scalars"]}


def folder_digest(path):
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("ref") / "run")


@pytest.fixture(scope="module")
def state_reference(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("ref") / "state", obs="state")


@pytest.fixture
def tmpfs(tmp_path):
    """A small filesystem of its own (needs root, as CI runs); skipped where mounting is refused."""
    mounted = []

    def mount(options):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]
        if subprocess.run(cmd, capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def signal_after(monkeypatch, owner, where, calls, sig=signal.SIGINT, times=1):
    """Patch owner.<where> to send this process `sig` (`times` times) after its `calls`-th call."""
    original, count = getattr(owner, where), [0]

    def wrapped(*a, **k):
        result = original(*a, **k)
        count[0] += 1
        if count[0] == calls:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return result

    monkeypatch.setattr(owner, where, wrapped)


# ---------------------------------------------------------------------------- hyperparameters
def readme_hyperparameters():
    """The `--flag | value` cells of README.md's hyperparameter table."""
    with open(os.path.join(HERE, "README.md")) as f:
        rows = re.findall(r"\| `--([a-z0-9-]+)` \| ([^|]+?) (?=\|)", f.read())
    return {flag.replace("-", "_"): value.strip() for flag, value in rows}


def test_every_paper_hyperparameter_is_the_default_readme_states():
    stated = readme_hyperparameters()
    # The paper's and the authors' values, each also stated in README.md's table.
    paper = {"batch_size": 128, "init_steps": 1000, "gamma": 0.99, "critic_lr": 1e-3,
             "critic_beta": 0.9, "critic_tau": 0.01, "encoder_tau": 0.05,
             "target_update_freq": 2, "actor_lr": 1e-3, "actor_beta": 0.9,
             "actor_update_freq": 2, "actor_log_std_min": -10.0, "actor_log_std_max": 2.0,
             "init_temperature": 0.1, "alpha_lr": 1e-4, "alpha_beta": 0.5, "hidden_dim": 1024,
             "feature_dim": 50, "num_filters": 32, "num_conv_layers": 4, "encoder_lr": 1e-3,
             "decoder_lr": 1e-3, "decoder_weight_decay": 1e-7, "decoder_latent_lambda": 1e-6,
             "ae_bits": 5, "frame_stack": 3, "image_size": 84, "buffer_size": 1_000_000,
             "eval_episodes": 10}  # fmt: skip
    assert set(paper) <= set(stated), sorted(set(paper) - set(stated))
    args = sac_ae.parse_args(["--buffer-size", "1000000", "--total-steps", "8000000"])
    for name, value in paper.items():
        assert float(stated[name]) == value, f"README states --{name} {stated[name]}"
        assert getattr(args, name) == value, f"--{name} defaults to {getattr(args, name)}"
    # Resolved from others: a checkpoint at each evaluation, a burst as long as --init-steps.
    assert (args.checkpoint_freq, args.init_updates) == (10_000, 1000)
    moved = sac_ae.parse_args(["--eval-freq", "5000", "--init-steps", "300", "--seed", "7"])
    assert (moved.checkpoint_freq, moved.init_updates) == (5000, 300)  # they follow, not fixed
    assert re.fullmatch(r"runs/cheetah-run-s7-\d{8}-\d{6}", moved.out_dir), moved.out_dir
    edge = sac_ae.parse_args(["--gamma", "0", "--critic-tau", "0", "--actor-beta", "0"])
    assert (edge.gamma, edge.critic_tau, edge.actor_beta) == (0, 0, 0)  # in range, if odd


def test_agent_uses_the_stated_optimizers_temperature_and_target_entropy():
    agent, args = make_agent("--hidden-dim", "1024", "--feature-dim", "50", action_dim=6)
    stated = readme_hyperparameters()
    expected = {"critic_opt": ("critic_lr", "critic_beta", 0.0),
                "actor_opt": ("actor_lr", "actor_beta", 0.0),
                "log_alpha_opt": ("alpha_lr", "alpha_beta", 0.0),
                "encoder_opt": ("encoder_lr", None, 0.0),
                "decoder_opt": ("decoder_lr", None, float(stated["decoder_weight_decay"])),
                }  # fmt: skip
    for name, (lr, beta, decay) in expected.items():
        group = getattr(agent, name).param_groups[0]
        assert group["lr"] == float(stated[lr]), name
        assert group["betas"] == (float(stated[beta]) if beta else 0.9, 0.999), name
        assert group["weight_decay"] == decay, name
    assert agent.alpha.item() == pytest.approx(float(stated["init_temperature"]))
    assert agent.target_entropy == -6.0  # -|A|
    assert agent.critic.Q1[0].out_features == 1024 and agent.critic.head[0].out_features == 50


# ---------------------------------------------------------------------------- environment
class Graphed(sac_ae.SACAE):
    """An agent that takes itself for one replayed from CUDA graphs (--compile on a GPU)."""

    cuda_graphs = True


@pytest.mark.parametrize("decoder", ["pixel", "vae"])
def test_each_optimizer_moves_the_parameters_its_loss_owns(decoder):
    agent, _ = make_agent("--decoder", decoder)

    def ids(params):
        return sorted(id(p) for p in params)

    encoder, head = [*agent.encoder.parameters()], [*agent.critic.head.parameters()]
    posterior = [*agent.critic.log_var.parameters()] if decoder == "vae" else []
    owned = {"critic_opt": encoder + [*agent.critic.parameters()],  # the log_var too, unused
             "actor_opt": [*agent.actor.parameters()],  # its own head, never the convs
             "log_alpha_opt": [agent.log_alpha],
             "encoder_opt": encoder + head + posterior,  # the AE step moves the critic's head
             "decoder_opt": [*agent.decoder.parameters()]}  # fmt: skip
    for name, opt in agent.optimizers().items():
        assert ids(p for g in opt.param_groups for p in g["params"]) == ids(owned[name]), name
        assert (opt.defaults["fused"], opt.defaults["capturable"]) == (True, False), name
    graphed, _ = make_agent("--decoder", decoder, cls=Graphed)  # a CUDA graph needs capturable
    assert all(opt.defaults["capturable"] for opt in graphed.optimizers().values())


@pytest.mark.parametrize("domain,task,repeat", [("cheetah", "run", 4), ("cartpole", "swingup", 8)])
def test_pixel_observation_is_stacked_uint8_channels_first(domain, task, repeat):
    env = sac_ae.DMCEnv(domain, task, seed=0, action_repeat=repeat)
    obs = env.reset()
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8
    obs, reward, discount, done, steps = env.step(np.zeros(env.action_dim))
    assert obs.shape == (9, 84, 84) and obs.dtype == np.uint8
    assert steps == repeat and discount == 1.0 and not done


def test_stack_after_reset_repeats_the_first_frame_then_shifts():
    env = sac_ae.DMCEnv("cheetah", "run", seed=0, action_repeat=4)
    obs = env.reset()
    first = env.env.physics.render(84, 84, camera_id=0).transpose(2, 0, 1)
    for j in range(3):
        assert np.array_equal(obs[3 * j : 3 * j + 3], first)
    nxt, *_ = env.step(np.ones(env.action_dim))
    assert np.array_equal(nxt[:6], obs[3:])  # shifted by one frame
    newest = env.env.physics.render(84, 84, camera_id=0).transpose(2, 0, 1)
    assert np.array_equal(nxt[6:], newest) and not np.array_equal(nxt[6:], first)


def test_action_repeat_sums_rewards_and_advances_physics_r_times():
    wrapped = sac_ae.DMCEnv("cheetah", "run", seed=5, obs="state", action_repeat=4)
    raw = sac_ae.load_suite().load("cheetah", "run", task_kwargs={"random": 5})
    wrapped.reset(), raw.reset()
    rng = np.random.default_rng(0)
    for _ in range(3):
        action = rng.uniform(-1, 1, wrapped.action_dim).astype(np.float32)  # as the agent's are
        _, reward, _, _, steps = wrapped.step(action)
        expected = sum(raw.step(action).reward for _ in range(4))
        assert steps == 4
        assert reward == pytest.approx(expected, rel=1e-12)
    assert wrapped.env.physics.data.time == pytest.approx(raw.physics.data.time)
    assert wrapped.env.physics.data.time == pytest.approx(12 * raw.physics.timestep())
    assert np.array_equal(wrapped.env.physics.data.qpos, raw.physics.data.qpos)


def test_episode_lasts_1000_environment_steps_in_agent_steps():
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, obs="state", action_repeat=8)
    env.reset()
    agent_steps, env_steps, done = 0, 0, False
    while not done:
        _, _, discount, done, steps = env.step(np.zeros(env.action_dim))
        agent_steps, env_steps = agent_steps + 1, env_steps + steps
    assert (agent_steps, env_steps) == (125, 1000) == (env.episode_length, 1000)
    assert discount == 1.0  # a time limit, not a terminal: the critic bootstraps through it


def test_a_true_terminal_stops_the_repeat_with_discount_0():
    # DMC's episodes end by time limit (discount 1, above); a task that terminates (dm_control's
    # lqr can) gives discount 0, the not-done the critic stops bootstrapping at.
    import dm_env

    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, obs="state", action_repeat=8)
    env.reset()
    real, calls, rewards = env.env.step, [], []

    def step(action):  # the 3rd physics step of the repeat is a terminal
        calls.append(action)
        time_step = real(action)
        if len(calls) == 3:
            time_step = time_step._replace(step_type=dm_env.StepType.LAST, discount=0.0)
        rewards.append(time_step.reward)
        return time_step

    env.env.step = step
    _, reward, discount, done, steps = env.step(np.zeros(env.action_dim))
    assert (discount, done, steps, len(calls)) == (0.0, True, 3, 3)
    assert reward == sum(rewards) and rewards[2] > 0  # the terminal step's reward counts too


def test_agent_steps_count_an_episodes_short_last_step():
    for repeat in (3, 8):
        env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, obs="state", action_repeat=repeat)
        agent_steps, env_steps, done = 0, 0, True
        while env_steps < 2500:  # the training loop's rule: act until the budget is reached
            if done:
                env.reset()
            *_, done, steps = env.step(np.zeros(env.action_dim))
            agent_steps, env_steps = agent_steps + 1, env_steps + steps
        assert env.agent_steps(2500) == agent_steps, repeat  # 3: 835, where 2500 / 3 gives 834


def test_an_action_repeat_as_long_as_the_episode_is_one_agent_step():
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, obs="state", action_repeat=1000)
    env.reset()
    *_, done, steps = env.step(np.zeros(env.action_dim))
    assert (env.episode_length, done, steps) == (1, True, 1000)


def test_action_repeat_defaults_per_domain():
    expected = {"cartpole": ("swingup", 8), "reacher": ("easy", 4), "cheetah": ("run", 4),
                "finger": ("spin", 2), "ball_in_cup": ("catch", 4), "walker": ("walk", 2),
                "hopper": ("hop", 2)}  # fmt: skip
    for domain, (task, repeat) in expected.items():
        assert sac_ae.parse_args(["--domain", domain, "--task", task]).action_repeat == repeat
    assert sac_ae.parse_args(["--action-repeat", "3"]).action_repeat == 3


def test_quadruped_renders_from_camera_2():
    env = sac_ae.DMCEnv("quadruped", "walk", seed=0, action_repeat=2)
    assert env.camera_id == 2
    obs = env.reset()
    assert np.array_equal(obs[-3:], env.env.physics.render(84, 84, camera_id=2).transpose(2, 0, 1))
    assert not np.array_equal(obs[-3:], env.env.physics.render(84, 84).transpose(2, 0, 1))


def test_actions_reach_the_bounds_as_dmc2gym_maps_them():
    # Quadruped's bounds are not +-1: the mapping's precision shows. dmc2gym (the authors'
    # wrapper) keeps the bounds in float32, computes in float64 and hands the task float32.
    env = sac_ae.DMCEnv("quadruped", "walk", seed=0, obs="state", action_repeat=1)
    spec = env.env.action_spec()
    low, high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
    assert not np.all(np.abs(spec.maximum) == 1)
    env.reset()
    action = np.random.default_rng(0).uniform(-1, 1, env.action_dim).astype(np.float32)
    env.step(action)
    expected = ((action.astype(np.float64) + 1) / 2 * (high - low) + low).astype(np.float32)
    assert np.array_equal(env.env.physics.data.ctrl, expected)


# ---------------------------------------------------------------------------- replay buffer
def scripted_episodes(lengths, frame_stack, channels=1, size=2):
    """Frames numbered by time, stacked as DMCEnv does; yields buffer calls, naive transitions."""
    counter = 0
    for length in lengths:
        counter += 1
        frame = np.full((channels, size, size), counter % 256, np.uint8)
        stack = collections.deque([frame] * frame_stack, maxlen=frame_stack)
        obs = np.concatenate(stack)
        yield ("first", obs)
        for step in range(length):
            counter += 1
            stack.append(np.full((channels, size, size), counter % 256, np.uint8))
            next_obs = np.concatenate(stack)
            action = np.array([counter], np.float32)  # a unique id for the transition
            not_done = 0.0 if step == length - 1 and length % 2 else 1.0
            yield ("step", (obs, action, float(counter) / 7, next_obs, not_done))
            obs = next_obs


def test_replay_buffer_matches_naive_buffer_across_episodes_and_wraparound():
    buffer = replay((1, 2, 2), torch.uint8, capacity=20, episode_length=5)
    naive, first = [], {}  # the transitions; the write of each one's episode start, by slot
    lengths = [1, 5, 2, 7, 3, 1, 6, 4, 5, 2, 9, 1]  # > capacity in total: the ring wraps twice
    for kind, item in scripted_episodes(lengths, 3):
        if kind == "first":
            start = buffer.t
            buffer.add_first(item)
        else:
            first[buffer.t] = start
            buffer.add(item[1], item[2], item[4], item[3])
            naive.append(item)
        oldest = max(0, buffer.t - buffer.size)
        valid = [t for t in range(oldest, buffer.t) if buffer._valid(np.array([t]))[0]]
        # By hand, after every write: a transition is valid while the newest `size` writes hold
        # all its frames, the newest k + 1 of its episode.
        assert valid == [t for t, s in first.items() if max(s, t - 3) >= oldest], buffer.t
    assert buffer.t > 2 * buffer.size
    by_id = {int(a[0]): (o, a, r, n, d) for o, a, r, n, d in naive}
    obs, action, reward, next_obs, not_done = buffer.get(np.array(valid))
    ids = action[:, 0].int().tolist()
    assert set(ids) >= {int(a[0]) for _, a, _, _, _ in naive[-20:]}  # the newest at least
    for j, i in enumerate(ids):
        o, a, r, n, d = by_id[i]
        assert np.array_equal(obs[j].numpy(), o), f"obs of transition {i}"
        assert np.array_equal(next_obs[j].numpy(), n), f"next_obs of transition {i}"
        assert reward[j, 0].item() == pytest.approx(r) and not_done[j, 0].item() == d
    sampled = buffer.sample(4096)[1][:, 0].int().tolist()  # 4096 draws: each of ~20 is drawn
    assert set(sampled) == set(ids)  # the newest and the oldest too, nothing else


def test_replay_buffer_rebuilds_real_environment_stacks():
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=1, obs="state", frame_stack=3, action_repeat=8)
    buffer = replay(env.frame_shape, torch.float32, 200, env.episode_length)
    obs = env.reset()
    buffer.add_first(obs)
    naive = []
    for step in range(160):  # crosses the episode boundary at 125
        action = np.array([step / 200], np.float32)
        next_obs, reward, discount, done, _ = env.step(action)
        buffer.add(action, reward, discount, next_obs)
        naive.append((obs, next_obs))
        obs = next_obs
        if done:
            obs = env.reset()
            buffer.add_first(obs)
    slots = np.array([t for t in range(buffer.t) if buffer.age[t] > 0])
    b_obs, b_action, _, b_next, _ = buffer.get(slots)
    for j in range(len(slots)):
        o, n = naive[round(b_action[j, 0].item() * 200)]
        assert np.array_equal(b_obs[j].numpy(), o) and np.array_equal(b_next[j].numpy(), n)


def test_replay_memory_per_transition_at_84_pixels_is_under_21_5_kb():
    buffer = replay((3, 84, 84), torch.uint8, 100_000, 250, action_dim=6, storage="meta")
    assert buffer.nbytes / buffer.capacity < 21_500
    assert buffer.nbytes >= 100_000 * 3 * 84 * 84  # every transition keeps at least its frame


def test_replay_kept_apart_from_the_training_device_gathers_there_and_copies_the_batch():
    # The ring's storage and the batch's device are separate: on a GPU, storage = the GPU (or the
    # host when the ring does not fit); "meta" stands in for a device here.
    kept, elsewhere = (replay((1, 2, 2), torch.uint8, 20, 5, device="cpu", storage=s)
                       for s in ("cpu", None))  # fmt: skip
    assert kept.storage == elsewhere.storage == torch.device("cpu")
    sized = replay((3, 84, 84), torch.uint8, 1000, 250, device="cpu", storage="meta")
    assert sized.frames.device.type == "meta" and sized.age.nbytes == 4 * sized.size


def test_the_ring_goes_to_the_gpu_only_with_2_gib_to_spare(monkeypatch, capsys):
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, obs="state", action_repeat=8)
    need = sac_ae.ReplayBuffer((5,), torch.float32, 3, 1, 100, 125, storage="meta").nbytes
    stored, made = [], sac_ae.ReplayBuffer

    def recording(*a, **k):  # the storage asked for; made on "meta"
        stored.append(inspect.signature(made).bind(*a, **k).arguments.get("storage"))
        return made(*a[:6], storage="meta")

    monkeypatch.setattr(sac_ae, "ReplayBuffer", recording)
    for free_gib in (1.99, 2.01):  # beyond what the ring needs
        free = need + free_gib * 2**30
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, free))
        sac_ae.replay_buffer(env, 100, 0, torch.device("cuda"))
    assert [str(s) for s in stored] == ["meta", "cpu", "meta", "cuda"]  # sized, then made
    assert capsys.readouterr().out.count("it is kept in host memory") == 1


def test_replay_refuses_to_sample_before_its_first_transition_then_samples_it():
    buffer = replay((1, 2, 2), torch.uint8, 20, 5)
    buffer.add_first(np.zeros((3, 2, 2), np.uint8))
    with pytest.raises(RuntimeError, match="no transition yet"):
        buffer.sample(4)
    buffer.add(np.array([7.0], np.float32), 0.5, 1.0, np.ones((3, 2, 2), np.uint8))
    assert buffer.sample(4)[1][:, 0].tolist() == [7.0] * 4  # --init-steps 1: the newest is drawn


# ---------------------------------------------------------------------------- networks
@pytest.mark.parametrize("size", [84, 64, 65])
def test_network_shapes(size):
    args = sac_ae.parse_args(["--image-size", str(size), "--hidden-dim", "16"])
    agent = sac_ae.SACAE((9, size, size), 6, torch.device("cpu"), args)
    h = features(agent, torch.randint(0, 256, (2, 9, size, size), dtype=torch.uint8))
    z = agent.critic.head(h)
    assert z.shape == (2, 50) and z.abs().max() <= 1
    assert agent.decoder(z).shape == (2, 9, size, size)
    q1, q2 = agent.critic(h, torch.zeros(2, 6))
    assert q1.shape == q2.shape == (2, 1)
    mu, log_std = agent.actor(h)
    assert mu.shape == log_std.shape == (2, 6)
    assert log_std.min() >= -10 and log_std.max() <= 2
    if size == 84:
        assert agent.encoder.repr_dim == h.shape[1] == 32 * 35 * 35


def test_each_conv_and_deconv_but_the_last_and_the_decoders_fc_are_followed_by_a_relu():
    agent, args = make_agent()
    assert [type(m) for m in agent.encoder.convs] == [torch.nn.Conv2d, torch.nn.ReLU] * 4
    deconvs = [type(m) for m in agent.decoder.deconvs]
    assert deconvs == [torch.nn.ConvTranspose2d, torch.nn.ReLU] * 3 + [torch.nn.ConvTranspose2d]
    with torch.no_grad():  # fc's output all -1: after its ReLU, the deconvs read zeros
        agent.decoder.fc.weight.zero_(), agent.decoder.fc.bias.fill_(-1.0)
        side = agent.decoder.side
        zeros = torch.zeros(2, args.num_filters, side, side)
        assert torch.equal(agent.decoder(torch.randn(2, 8)), agent.decoder.deconvs(zeros))


def test_the_probe_reads_the_critics_latent():
    agent, args = make_agent()
    obs = random_batch(agent, args, batch=1)[0]
    with torch.no_grad():
        critic, actor = (
            head(features(agent, obs))[0] for head in (agent.critic.head, agent.actor.head)
        )
    assert not torch.allclose(critic, actor)
    np.testing.assert_allclose(agent.latent(obs[0].numpy()), critic.numpy(), rtol=1e-5, atol=1e-6)


def test_actor_and_critic_read_one_encoder_each_with_its_own_head():
    agent, _ = make_agent()
    assert agent.actor.head is not agent.critic.head
    assert not set(map(id, agent.actor.parameters())) & set(map(id, agent.encoder.parameters()))
    assert agent.encoder_target is not agent.encoder
    opt_params = {id(p) for p in agent.actor_opt.param_groups[0]["params"]}
    assert opt_params == {id(p) for p in agent.actor.parameters()}  # never the encoder


def test_weights_start_orthogonal_and_conv_kernels_at_their_centre_tap():
    # The authors' weight_init: orthogonal Linear weights, zero biases; conv kernels zero but the
    # centre tap, orthogonal with ReLU's gain sqrt(2). Each latent head: Linear-LayerNorm-tanh.
    agent, _ = make_agent("--decoder", "vae")
    nn = torch.nn
    for head in (agent.actor.head, agent.critic.head):
        assert [type(m) for m in head] == [nn.Linear, nn.LayerNorm, nn.Tanh]

    def gram(w, gain):  # w w^T on the side where the rows are orthonormal, over gain^2
        w = w.detach().double()
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        return g / gain**2

    linears = [m for m in agent.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in agent.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    # Critic and its target: head, Q1, Q2, log_var (8 each); actor 4, decoder 1; 4 convs in the
    # encoder, its target and the decoder.
    assert len(linears) == 2 * 8 + 4 + 1 and len(convs) == 3 * 4
    for m in linears + convs:
        linear = isinstance(m, nn.Linear)
        w = m.weight if linear else m.weight[:, :, 1, 1]
        eye = torch.eye(min(w.shape), dtype=torch.float64)
        assert torch.allclose(gram(w, 1 if linear else 2**0.5), eye, atol=1e-5), m
        assert not m.bias.any() and m.weight.count_nonzero() == w.count_nonzero()  # off-centre: 0


def test_targets_and_autoencoder_move_on_the_steps_their_flags_name():
    # The defaults (2, 2, 1) hide which flag gates which part: here they are 2, 3 and 4.
    flags = ["--actor-update-freq", "2", "--target-update-freq", "3", "--ae-update-freq", "4"]
    agent, args = make_agent(*flags)
    parts = {2: agent.actor.parameters, 4: agent.decoder.parameters}
    parts[3] = lambda: [*agent.encoder_target.parameters(), *agent.critic_target.parameters()]
    for step in range(1, 13):
        before = {n: snapshot(params()) for n, params in parts.items()}
        metrics = agent.update(random_batch(agent, args, seed=step), step)
        moved = {n for n, params in parts.items() if not same(before[n], params())}
        assert moved == {n for n in parts if step % n == 0}, step
        assert ("actor_loss" in metrics, "ae_loss" in metrics) == (step % 2 == 0, step % 4 == 0)


# ---------------------------------------------------------------------------- gradient routing
def critic_step(agent, batch):
    obs, action, reward, next_obs, not_done = batch
    return agent.update_critic(
        agent.prepare(obs), action, reward, agent.prepare(next_obs), not_done
    )


def test_critic_step_moves_conv_weights():
    agent, args = make_agent()
    before = snapshot(agent.encoder.parameters())
    critic_step(agent, random_batch(agent, args))
    assert not same(before, agent.encoder.parameters())


def test_actor_loss_leaves_conv_weights_and_critic_unchanged():
    agent, args = make_agent()
    h = features(agent, random_batch(agent, args)[0])
    before, critic_before = (
        snapshot(agent.encoder.parameters()),
        snapshot(agent.critic.parameters()),
    )
    head_before = snapshot(agent.actor.head.parameters())
    agent.update_actor_and_alpha(h.detach())
    assert same(before, agent.encoder.parameters())
    assert same(critic_before, agent.critic.parameters())
    assert not same(head_before, agent.actor.head.parameters())


def test_update_hands_the_actor_detached_features():
    agent, args = make_agent()
    seen = []
    agent.update_actor_and_alpha = lambda h: seen.append(h) or {}
    agent.update(random_batch(agent, args), step=2)
    assert (
        len(seen) == 1 and not seen[0].requires_grad
    )  # so the actor's loss cannot reach the convs


def test_full_update_on_an_odd_step_does_not_touch_the_actor():
    agent, args = make_agent()
    actor_before = snapshot(agent.actor.policy.parameters())
    agent.update(random_batch(agent, args), step=1)
    assert same(actor_before, agent.actor.policy.parameters())
    agent.update(random_batch(agent, args), step=2)
    assert not same(actor_before, agent.actor.policy.parameters())


def test_decoder_step_moves_conv_and_decoder_weights():
    agent, args = make_agent()
    obs = random_batch(agent, args)[0]
    before, dec_before = snapshot(agent.encoder.parameters()), snapshot(agent.decoder.parameters())
    agent.update_autoencoder(obs, features(agent, obs))
    assert not same(before, agent.encoder.parameters())
    assert not same(dec_before, agent.decoder.parameters())


def test_soft_target_update_moves_encoder_by_0_05_and_q_networks_by_0_01():
    agent, _ = make_agent()
    with torch.no_grad():
        for p in [*agent.critic.parameters(), *agent.encoder.parameters()]:
            p.add_(torch.randn_like(p))
    old_critic, old_encoder = (
        copy.deepcopy(agent.critic_target),
        copy.deepcopy(agent.encoder_target),
    )
    agent.update_targets()
    pairs = [("encoder", agent.encoder, old_encoder, agent.encoder_target, 0.05),
             ("critic head", agent.critic.head, old_critic.head, agent.critic_target.head, 0.05),
             ("Q1", agent.critic.Q1, old_critic.Q1, agent.critic_target.Q1, 0.01),
             ("Q2", agent.critic.Q2, old_critic.Q2, agent.critic_target.Q2, 0.01)]  # fmt: skip
    for name, online, before, after, tau in pairs:
        for p, prev, new in zip(online.parameters(), before.parameters(), after.parameters()):
            assert torch.allclose(new, prev + tau * (p - prev), atol=1e-6), name


# ---------------------------------------------------------------------------- the losses
def spy_on_mse(monkeypatch):
    """Record the (prediction, target) pairs the update hands F.mse_loss."""
    calls, mse = [], torch.nn.functional.mse_loss
    monkeypatch.setattr(sac_ae.F, "mse_loss", lambda a, b: calls.append((a, b)) or mse(a, b))
    return calls


@pytest.mark.parametrize("not_done", [0.0, 1.0])
def test_terminal_transition_target_is_the_reward_alone(monkeypatch, not_done):
    agent, args = make_agent()
    obs, action, reward, next_obs, _ = random_batch(agent, args)
    calls = spy_on_mse(monkeypatch)
    critic_step(agent, (obs, action, reward, next_obs, torch.full_like(reward, not_done)))
    target = calls[0][1]
    assert torch.equal(target, reward) == (not_done == 0.0)


def test_bellman_target_is_reward_plus_discounted_soft_value(monkeypatch):
    agent, args = make_agent("--gamma", "0.5")
    obs, action, reward, next_obs, not_done = random_batch(agent, args)
    torch.manual_seed(7)  # the next-action noise, drawn by hand first
    with torch.no_grad():
        pi, log_pi = sac_ae.sample_action(*agent.actor(features(agent, next_obs)))
        tq1, tq2 = agent.critic_target(agent.encoder_target(agent.prepare(next_obs)), pi)
    expected = reward + 0.5 * (torch.min(tq1, tq2) - 0.1 * log_pi)  # alpha starts at 0.1
    calls = spy_on_mse(monkeypatch)
    torch.manual_seed(7)
    critic_step(agent, (obs, action, reward, next_obs, not_done))
    assert torch.allclose(calls[0][1], expected, atol=1e-6)


def test_reconstruction_target_is_5_bit_grid_plus_dequantisation_noise(monkeypatch):
    agent, _ = make_agent()
    obs = torch.arange(256, dtype=torch.uint8).repeat(36 * 16).view(-1, 9, 32, 32)[:4]
    calls = spy_on_mse(monkeypatch)
    agent.update_autoencoder(obs, features(agent, obs))
    target = calls[0][1]
    assert target.min() >= -0.5 and target.max() <= 0.5
    grid = torch.floor(obs.float() / 8) / 32 - 0.5  # the 5-bit bin each pixel falls in
    noise = target - grid
    assert noise.min() >= 0 and noise.max() < 1 / 32 + 1e-7
    assert noise.std() > 0.25 / 32  # uniform over the bin, not a constant offset


def test_latent_penalty_is_one_millionth_of_half_the_squared_norm(monkeypatch):
    agent, _ = make_agent()
    obs = random_batch(agent, agent.args)[0]
    calls = spy_on_mse(monkeypatch)
    with torch.no_grad():
        z = agent.critic.head(features(agent, obs))
    metrics = agent.update_autoencoder(obs, features(agent, obs))
    penalty = 1e-6 * (0.5 * z.pow(2).sum(1)).mean()
    recon = torch.nn.functional.mse_loss(*calls[0])
    assert metrics["ae_loss"].item() == pytest.approx((recon + penalty).item(), rel=1e-6)
    assert metrics["ae_loss"].item() > recon.item()


@pytest.mark.parametrize("log_std,direction", [(-10.0, +1), (0.0, -1)])
def test_temperature_rises_when_entropy_is_below_target_and_falls_above(log_std, direction):
    agent, args = make_agent()
    last = agent.actor.policy[-1]
    with torch.no_grad():  # pin the policy's std: log_std output = tanh^-1 of the wanted point
        last.weight.zero_()
        u = (log_std - args.actor_log_std_min) / (args.actor_log_std_max - args.actor_log_std_min)
        last.bias[3:] = torch.atanh(torch.tensor(max(min(2 * u - 1, 0.999), -0.999)))
    h = features(agent, random_batch(agent, args)[0])
    before = agent.log_alpha.item()
    metrics = agent.update_actor_and_alpha(h.detach())
    below = metrics["entropy"].item() < agent.target_entropy
    assert below == (direction > 0)
    assert (agent.log_alpha.item() - before) * direction > 0


def test_the_squashed_gaussians_log_probability_is_the_change_of_variables_with_1e_6():
    mu = torch.tensor([[0.3, -1.2, 20.0]], dtype=torch.float64)  # the last saturates: tanh = 1
    log_std = torch.tensor([[-0.5, 0.2, -3.0]], dtype=torch.float64)
    torch.manual_seed(0)
    action, log_prob = sac_ae.sample_action(mu, log_std)
    torch.manual_seed(0)
    u = mu + torch.randn_like(mu) * log_std.exp()  # the same draw
    gaussian = torch.distributions.Normal(mu, log_std.exp()).log_prob(u).sum()
    squash = torch.log(torch.clamp(1 - torch.tanh(u) ** 2, min=0) + 1e-6).sum()
    assert torch.equal(action, torch.tanh(u)) and action[0, 2] == 1
    assert log_prob.item() == pytest.approx((gaussian - squash).item(), abs=1e-9)


def test_evaluation_acts_with_tanh_of_the_mean():
    agent, args = make_agent(action_dim=1)
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=args.image_size, action_repeat=8)
    obs = env.reset()
    with torch.no_grad():
        mu, _ = agent.actor(features(agent, torch.as_tensor(obs)[None]))
    assert np.allclose(agent.act(obs, deterministic=True), torch.tanh(mu)[0].numpy(), atol=1e-6)
    taken = []
    act = agent.act
    agent.act = lambda o, deterministic=False: taken.append(deterministic) or act(o, deterministic)
    sac_ae.evaluate(env, agent, episodes=1)
    assert taken and all(taken)


def test_evaluation_returns_each_episodes_summed_reward(monkeypatch):
    agent, _ = make_agent("--obs", "state", action_dim=1)
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, obs="state", frame_stack=1, action_repeat=8)
    step, episodes = env.step, [[]]

    def recording(action):
        out = step(action)
        episodes[-1].append(out[1])
        episodes.extend([[]] * out[3])  # done: the next reward is the next episode's
        return out

    monkeypatch.setattr(env, "step", recording)
    returns, latents, states, _ = sac_ae.evaluate(env, agent, episodes=2, probe=True)
    assert [len(e) for e in episodes] == [125, 125, 0]
    assert returns == [sum(e) for e in episodes[:2]] and returns[0] != returns[1]
    assert len(latents) == len(states) == 250  # the probe reads every episode's observations


# ---------------------------------------------------------------------------- the update, literally
def literal_update(agent, batch, step):
    """The update transcribed from the paper and the authors' code, step by step, every part
    recomputing its own forward passes: the reference SACAE.update must equal. The same random
    draws in the same order: the critic's next-action noise, the actor's noise (even steps), the
    dequantisation noise.
    """
    a = agent.args
    obs, action, reward, next_obs, not_done = batch

    def squashed_sample(mu, log_std):
        eps = torch.randn_like(mu)
        u = mu + eps * torch.exp(log_std)
        log_p = torch.sum(-0.5 * eps**2 - log_std, dim=-1, keepdim=True)
        log_p = log_p - 0.5 * np.log(2 * np.pi) * mu.shape[-1]
        act = torch.tanh(u)
        correction = torch.log(torch.clamp(1 - act**2, min=0) + 1e-6)
        return act, log_p - torch.sum(correction, dim=-1, keepdim=True)

    def conv_features(encoder, o):  # x/255 through the convs, flattened (state: the vector itself)
        if isinstance(encoder.convs, torch.nn.Identity):
            return o
        return encoder.convs(o.float().div_(255)).flatten(1)

    def policy(o):  # the actor's head on detached conv features, then its MLP
        feat = agent.actor.head(conv_features(agent.encoder, o).detach())
        mu, raw = agent.actor.policy(feat).chunk(2, dim=-1)
        lo, hi = a.actor_log_std_min, a.actor_log_std_max
        return mu, lo + (hi - lo) * (torch.tanh(raw) + 1) / 2

    def q_values(encoder, critic, o, act, detach=False):
        h = conv_features(encoder, o)
        z = critic.head(h.detach() if detach else h)
        return critic.Q1(torch.cat([z, act], 1)), critic.Q2(torch.cat([z, act], 1))

    alpha = agent.log_alpha.exp().detach()
    # 1. critic
    with torch.no_grad():
        next_act, next_log_p = squashed_sample(*policy(next_obs))
        tq1, tq2 = q_values(agent.encoder_target, agent.critic_target, next_obs, next_act)
        y = reward + a.gamma * not_done * (torch.min(tq1, tq2) - alpha * next_log_p)
    q1, q2 = q_values(agent.encoder, agent.critic, obs, action)
    critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    agent.critic_opt.zero_grad()
    critic_loss.backward()
    agent.critic_opt.step()
    if step % a.actor_update_freq == 0:
        # 2. actor, then temperature
        pi, log_p = squashed_sample(*policy(obs))
        aq1, aq2 = q_values(agent.encoder, agent.critic, obs, pi, detach=True)
        actor_loss = torch.mean(agent.log_alpha.exp().detach() * log_p - torch.min(aq1, aq2))
        agent.actor_opt.zero_grad()
        actor_loss.backward()
        agent.actor_opt.step()
        alpha_loss = torch.mean(agent.log_alpha.exp() * (-log_p - agent.target_entropy).detach())
        agent.log_alpha_opt.zero_grad()
        alpha_loss.backward()
        agent.log_alpha_opt.step()
    if step % a.target_update_freq == 0:
        # 3. targets: Q networks slowly, the encoder (convs and the critic's head) faster
        with torch.no_grad():
            for online, target, tau in (
                (agent.critic.Q1, agent.critic_target.Q1, a.critic_tau),
                (agent.critic.Q2, agent.critic_target.Q2, a.critic_tau),
                (agent.critic.head, agent.critic_target.head, a.encoder_tau),
                (agent.encoder, agent.encoder_target, a.encoder_tau),
            ):
                for p, tp in zip(online.parameters(), target.parameters()):
                    tp.copy_(tau * p + (1 - tau) * tp)
    if agent.decoder is not None and step % a.ae_update_freq == 0:
        # 4. autoencoder
        z = agent.critic.head(conv_features(agent.encoder, obs))
        target = torch.floor(obs.float() / 8) / 32 + torch.rand(obs.shape) / 32 - 0.5
        loss = ((agent.decoder(z) - target) ** 2).mean()
        loss = loss + a.decoder_latent_lambda * (0.5 * (z**2).sum(1)).mean()
        agent.encoder_opt.zero_grad()
        agent.decoder_opt.zero_grad()
        loss.backward()
        agent.encoder_opt.step()
        agent.decoder_opt.step()


@pytest.mark.parametrize("extra", [[], ["--decoder", "none"], ["--obs", "state"]])
def test_optimised_update_equals_literal_transcription(extra):
    agent, args = make_agent(*extra)
    with torch.no_grad():  # open a gap between online and target weights, so target rates show
        for p in [*agent.critic.parameters(), *agent.encoder.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    reference, initial = copy.deepcopy(agent), agent_state(copy.deepcopy(agent))
    for step in (2, 3, 4):  # even, odd, even: the actor and targets move on even steps only
        if args.obs == "pixels":
            batch = random_batch(agent, args, seed=step)
        else:
            batch = state_batch(4, 5, 3, seed=step)
        torch.manual_seed(100 + step)
        agent.update(batch, step)
        torch.manual_seed(100 + step)
        literal_update(reference, batch, step)
    ours, theirs = agent_state(agent), agent_state(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=0), name
    moved = [name for name in ours if not torch.equal(ours[name], initial[name])]
    assert "log_alpha" in moved and "critic_target.Q1.0.weight" in moved
    assert "actor.policy.0.weight" in moved


def plain_copy(agent):
    """A copy of the agent laid out as the authors' code runs: NCHW tensors, for-loop Adam."""
    plain = copy.deepcopy(agent)
    for p in plain.parameters():
        p.data = p.data.contiguous()
    for name, opt in plain.optimizers().items():
        g = opt.param_groups[0]
        adam = torch.optim.Adam(g["params"], g["lr"], g["betas"], weight_decay=g["weight_decay"])
        setattr(plain, name, adam)
    return plain


def test_plain_layout_computes_the_same_update():
    agent, args = make_agent()
    plain = plain_copy(agent)
    assert plain.encoder.convs[0].weight.is_contiguous()
    assert not agent.encoder.convs[0].weight.is_contiguous()  # channels-last
    batch = random_batch(agent, args)
    for step in (2, 3):
        torch.manual_seed(step)
        agent.update(batch, step)
        torch.manual_seed(step)
        literal_update(plain, batch, step)
    for name, value in agent_state(agent).items():
        assert torch.allclose(value, agent_state(plain)[name], atol=1e-5, rtol=0), name


def test_bf16_update_runs_and_keeps_parameters_float32():
    agent, args = make_agent("--precision", "bf16")
    before, batch = snapshot(agent.encoder.parameters()), random_batch(agent, args)
    seen = []  # what the Q and policy MLPs compute in: float32, as a Q of 640 would round by 4
    for m in [*agent.critic.Q1, *agent.critic.Q2, *agent.actor.policy]:  # 15 layers
        m.register_forward_hook(lambda _, inputs, out: seen.extend([inputs[0].dtype, out.dtype]))
    with agent.autocast():
        h = agent.encoder(agent.prepare(batch[0]))
        agent.critic(h, batch[1]), agent.actor(h)
    assert h.dtype == torch.bfloat16 and set(seen) == {torch.float32} and len(seen) == 30
    metrics = agent.update(batch, step=2)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert not same(before, agent.encoder.parameters())
    assert all(p.dtype == torch.float32 for p in agent.parameters())
    assert all(s["exp_avg"].dtype == torch.float32 for s in agent.critic_opt.state.values())


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_acting_runs_in_the_training_precision(precision, dtype):
    agent, args = make_agent("--precision", precision, action_dim=1)
    seen = []
    agent.encoder.convs.register_forward_hook(lambda _, inputs, out: seen.append(out.dtype))
    obs = random_batch(agent, args)[0][0].numpy()
    agent.act(obs), agent.act(obs, deterministic=True), agent.latent(obs)
    assert seen == [dtype] * 3


def test_bf16_actor_reads_the_convs_as_the_critic_step_left_them(monkeypatch):
    # autocast may keep a bf16 copy of each weight while it is open; the optimizers step the
    # weights inside the update, so a kept copy would feed the actor the convs of before.
    agent, args = make_agent("--precision", "bf16")
    batch, seen = random_batch(agent, args), []
    monkeypatch.setattr(agent, "update_actor_and_alpha", lambda h: seen.append(h) or {})
    monkeypatch.setattr(agent, "update_autoencoder", lambda pixels, h: {})
    agent.update(batch, step=2)  # critic, then the actor's read, then the (unmoved) targets
    with agent.autocast(), torch.no_grad():
        assert torch.equal(seen[0], agent.encoder(agent.prepare(batch[0])))


# ---------------------------------------------------------------------------- memory
@pytest.mark.parametrize(
    "extra", [[], ["--decoder", "vae"], ["--decoder", "none"], ["--obs", "state"]]
)
def test_update_metrics_own_only_their_own_bytes(extra):
    agent, args = make_agent(*extra)
    batch = random_batch(agent, args) if args.obs == "pixels" else state_batch(4, 5, 3)
    for step in (1, 2):  # odd: critic and autoencoder; even: actor, temperature and targets too
        for name, value in agent.update(batch, step).items():
            assert value.untyped_storage().nbytes() <= 8, (name, value.untyped_storage().nbytes())


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_resident_memory_stays_flat_while_the_loop_keeps_metrics():
    # 84x84 at batch 16: the batch's buffers are megabytes, as at batch 128. A leaked
    # reconstruction buffer, or each update's metrics kept as tensors of their own, grew resident
    # memory by megabytes per update.
    agent, args = make_agent("--image-size", "84", "--batch-size", "16", action_dim=1)
    kept = sac_ae.EpisodeMetrics(torch.device("cpu"))  # as the training loop keeps them
    for step in range(60):
        batch = random_batch(agent, args, batch=16, action_dim=1, seed=step)  # new, as sampled
        kept.add(step, agent.update(batch, step))
        if step == 19:
            after_20 = resident_bytes()
    assert resident_bytes() - after_20 < 16 * 2**20, (resident_bytes() - after_20) / 2**20
    assert len(kept.means()) == 8  # critic_loss, q, actor_loss, alpha_loss, alpha, entropy, ae


def test_episode_metrics_name_the_first_non_finite_loss_and_its_step():
    kept = sac_ae.EpisodeMetrics(torch.device("cpu"))
    for step in range(5):
        metrics = {"critic_loss": torch.tensor(float(step)), "q": torch.tensor(1.0)}
        if step % 2 == 0:
            metrics["actor_loss"] = torch.tensor(float("inf") if step == 4 else 2.0)
        kept.add(step, metrics)
    with pytest.raises(sac_ae.NonFiniteError, match="actor_loss became inf at agent step 4"):
        kept.means()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # moved, as on resume
    restored = sac_ae.EpisodeMetrics(device)
    restored.load_state_dict(kept.state_dict())  # as a checkpoint keeps them
    kept.clear()
    for step in range(3):
        kept.add(step, {"critic_loss": torch.tensor(float(step))})
    assert kept.means() == {"critic_loss": 1.0}
    assert restored.steps == [0, 1, 2, 3, 4] and restored.present[1] == ("critic_loss", "q")


def test_episode_metrics_average_each_metric_over_the_updates_that_made_it():
    # 150 updates (the table starts at 64 rows and doubles), the actor's every 2nd: each mean is
    # numpy's over the rows that hold that metric, after a checkpoint's round trip too.
    kept, rng = sac_ae.EpisodeMetrics(torch.device("cpu")), np.random.default_rng(0)
    values = rng.normal(size=(150, 2)).astype(np.float32)
    for step, (critic, actor) in enumerate(values):
        metrics = {"critic_loss": torch.tensor(critic)}
        if step % 2 == 0:
            metrics["actor_loss"] = torch.tensor(actor)
        kept.add(step, metrics)
    expected = {"critic_loss": values[:, 0].mean(), "actor_loss": values[::2, 1].mean()}
    restored = sac_ae.EpisodeMetrics(torch.device("cpu"))
    restored.load_state_dict(kept.state_dict())
    for means in (kept.means(), restored.means()):
        assert means.keys() == expected.keys()
        assert all(means[k] == pytest.approx(v, abs=1e-6) for k, v in expected.items())
    kept.table[3, 0] = float("nan")  # an early row is still seen after the table grew
    with pytest.raises(sac_ae.NonFiniteError, match="critic_loss became nan at agent step 3"):
        kept.means()


# ---------------------------------------------------------------------------- the schedule
def test_updates_due_are_the_burst_at_init_steps_then_one_per_agent_step():
    args = sac_ae.parse_args(["--init-steps", "10", "--init-updates", "3"])
    by_hand, done = [], 0  # the authors' loop: at agent step 10 a burst of 3, then 1 per step
    for step in range(15):
        done += 3 if step == 10 else int(step > 10)
        by_hand.append(done)
    assert [sac_ae.updates_due(step, args) for step in range(15)] == by_hand


def test_init_steps_count_agent_steps_of_random_actions_and_evaluation_is_deterministic(
    tmp_path, monkeypatch
):
    calls, act = collections.Counter(), sac_ae.SACAE.act

    def counted(self, obs, deterministic=False):
        calls[deterministic] += 1
        return act(self, obs, deterministic)

    monkeypatch.setattr(sac_ae.SACAE, "act", counted)
    tiny_run(tmp_path / "run", obs="state")  # 75 agent steps of 8 env steps, --init-steps 30
    assert calls == {False: 75 - 30, True: 3 * 125}  # 3 evaluations of a 125-step episode


@pytest.fixture(scope="module")
def two_episodes(tmp_path_factory):
    """A state run of 2 episodes: its train.csv rows, the updates each row's means were over, and
    each write to the ring in order (None: an episode's first frame; else (reward, not-done))."""
    seen = types.SimpleNamespace(counted=[], writes=[])
    log_episode = sac_ae.Run.log_episode
    add, add_first = sac_ae.ReplayBuffer.add, sac_ae.ReplayBuffer.add_first

    def counting(run):
        seen.counted.append(len(run.metrics.steps))
        log_episode(run)

    def adding(ring, action, reward, not_done, next_obs):
        seen.writes.append((reward, not_done))
        add(ring, action, reward, not_done, next_obs)

    def adding_first(ring, obs):
        seen.writes.append(None)
        add_first(ring, obs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(sac_ae.Run, "log_episode", counting)
        m.setattr(sac_ae.ReplayBuffer, "add", adding)
        m.setattr(sac_ae.ReplayBuffer, "add_first", adding_first)
        out = tiny_run(tmp_path_factory.mktemp("two") / "run", obs="state", total_steps=2000)
    seen.rows = read_csv(out / "train.csv")
    return seen


def test_each_episode_row_holds_its_own_1000_steps_and_updates(two_episodes):
    rows = two_episodes.rows
    assert [int(r["episode"]) for r in rows] == [0, 1]
    assert [int(r["episode_length"]) for r in rows] == [1000, 1000]  # no row of 0 steps after
    assert [int(r["agent_step"]) for r in rows] == [125, 250]
    updates = [int(r["updates"]) for r in rows]
    counted = two_episodes.counted  # the updates that each row's means are over
    assert counted == [updates[0], updates[1] - updates[0]] == [30 + 94, 125]  # burst of 30


def test_each_episode_row_returns_the_sum_of_the_rewards_its_steps_stored(two_episodes):
    episodes, rewards = [], []
    for write in [*two_episodes.writes[1:], None]:
        if write is None:
            episodes.append(sum(rewards))
            rewards = []
        else:
            rewards.append(write[0])
    returns = [float(r["episode_return"]) for r in two_episodes.rows]
    np.testing.assert_allclose(returns, episodes[:2], rtol=1e-5)  # as train.csv writes: 6 digits
    assert min(returns) > 0 and episodes[2] == 0  # nothing stored after the last reset


def test_the_ring_gets_each_episodes_first_frame_then_its_steps_not_done_at_the_time_limit(
    two_episodes,
):
    not_done = [w if w is None else w[1] for w in two_episodes.writes]
    episode = [None, *[1.0] * 125]  # the time limit bootstraps: its not-done is 1 (Sec. 4.1)
    assert not_done == [*episode, *episode, None]  # the last reset's first frame, for a resume


def test_an_action_repeat_that_does_not_divide_1000_counts_true_env_steps(tmp_path):
    out = tiny_run(tmp_path / "run", "--action-repeat", "3", obs="state", total_steps=1000,
                   eval_freq=1000)  # fmt: skip
    rows = read_csv(out / "train.csv")
    assert [(r["env_step"], r["agent_step"], r["episode_length"]) for r in rows] == [
        ("1000", "334", "1000")  # 333 steps of 3 and a last one of 1
    ]
    assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0", "1000"]


def test_each_row_is_on_disk_when_its_console_line_is_printed(tmp_path, monkeypatch):
    on_disk, say = collections.defaultdict(list), sac_ae.say

    def reading(line):  # the console line comes right after its row
        for tag, name in (("[train]", "train.csv"), ("[eval]", "eval.csv")):
            if line.startswith(tag):
                on_disk[name].append(len(read_csv(tmp_path / "run" / name)))
        say(line)

    monkeypatch.setattr(sac_ae, "say", reading)
    tiny_run(tmp_path / "run", obs="state", total_steps=2000, eval_freq=1000)
    assert on_disk == {"eval.csv": [1, 2, 3], "train.csv": [1, 2]}


@slow
def test_fps_counts_this_process_and_wall_time_carries_across_a_resume(tmp_path, monkeypatch):
    """On a clock that reads 1e6 s at the start (not 0, which would pass for a duration), and
    ticks 1 s a training agent step (8 env steps) and 100 s an evaluation."""
    now, ticking, stops = [1e6], [True], [188]  # SIGINT at agent step 188: env step 1504
    step, evaluate = sac_ae.DMCEnv.step, sac_ae.evaluate

    def clock():
        return now[0]

    def ticking_step(env, action):
        now[0] += ticking[0]
        stops[0] -= ticking[0]
        if stops[0] == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return step(env, action)

    def timed_evaluate(*a, **k):
        ticking[0], now[0] = False, now[0] + 100
        try:
            return evaluate(*a, **k)
        finally:
            ticking[0] = True

    fake = types.SimpleNamespace(time=clock, perf_counter=clock, strftime=sac_ae.time.strftime)
    monkeypatch.setattr(sac_ae, "time", fake)
    monkeypatch.setattr(sac_ae.DMCEnv, "step", ticking_step)
    monkeypatch.setattr(sac_ae, "evaluate", timed_evaluate)
    out = tiny_run(tmp_path / "run", obs="state", total_steps=3000, eval_freq=2000, code=130)
    now[0] += 1e4  # the pause before the resume counts in neither
    resume(out)
    rows = [
        [float(r[k]) for k in ("env_step", "fps", "wall_time")] for r in read_csv(out / "train.csv")
    ]
    # Episode 1 (env steps 1000-2000), resumed at 1504: 496 steps in 62 s of this process, and
    # the 288 s before its checkpoint. The evaluation at 2000 falls in episode 2's time.
    expected = [[1000, 1000 / 225, 225], [2000, 496 / 62, 350], [3000, 1000 / 225, 575]]
    np.testing.assert_allclose(rows, expected, rtol=1e-5)  # as train.csv writes them: 6 digits
    evals = [float(r["wall_time"]) for r in read_csv(out / "eval.csv")]
    assert evals == [100, 450, 675]  # each evaluation's 100 s in its own row


def test_run_label_names_the_mode_from_config_json(tmp_path):
    modes = [("pixel", "pixels", "SAC+AE"), ("none", "pixels", "SAC:pixel"),
             ("vae", "pixels", "SAC+VAE"), ("none", "state", "SAC:state")]  # fmt: skip
    for decoder, obs, mode in modes:
        config = dict(domain="walker", task="walk", decoder=decoder, obs=obs)
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert sac_ae.run_label(str(tmp_path / "eval.csv")) == f"walker-walk, {mode}"


def test_run_label_is_the_folder_name_without_a_config_json_it_can_read(tmp_path, monkeypatch):
    folder = tmp_path / "seed-3"
    folder.mkdir()
    monkeypatch.chdir(folder)
    for config in [None, dict(domain="walker", task="walk", decoder="ae", obs="pixels"), [1]]:
        if config is not None:  # none, a decoder it does not know, not an object
            (folder / "config.json").write_text(json.dumps(config))
        assert sac_ae.run_label("eval.csv") == "seed-3"  # a relative path, as a shell gives it


def test_the_evaluation_environment_is_seeded_apart_from_the_training_one(tmp_path):
    args = sac_ae.parse_args([*STATE_RUN, "--out-dir", str(tmp_path / "run")])

    def first_state(seed):
        return sac_ae.DMCEnv("cartpole", "swingup", seed, obs="state", frame_stack=1).reset()

    with sac_ae.Run(args) as run:  # seed 2: the training env's 2, evaluation's 10002
        assert np.array_equal(run.obs, first_state(2))
        assert np.array_equal(run.eval_env.reset(), first_state(2 + sac_ae.EVAL_SEED_OFFSET))
        assert not np.array_equal(run.obs, first_state(2 + sac_ae.EVAL_SEED_OFFSET))


# ---------------------------------------------------------------------------- command line
@pytest.mark.parametrize(
    "argv,needle",
    [
        (["--domain", "chetah"], "valid: acrobot"),
        (["--task", "walk"], "for domain cheetah; valid: run"),
        (["--batch-size", "0"], "--batch-size"),
        (["--image-size", "12"], "too small"),
        (["--image-size", "14"], "too small"),  # 4 convs leave 0 x 0 of 14 x 14
        (["--obs", "state", "--decoder", "pixel"], "--decoder pixel needs --obs pixels"),
        (["--critic-tau", "1.5"], "--critic-tau"),
        (["--critic-beta", "1"], "--critic-beta: must be a number in [0, 1), as Adam needs"),
        (["--alpha-beta", "1.0"], "--alpha-beta"),
        (["--seed", "-1"], "argument --seed: must be an integer in [0, 2^32 - 10001], got '-1'"),
        (["--seed", "4294957296"], "--seed: must be an integer in [0, 2^32 - 10001]"),
        (["--ae-bits", "9"], "--ae-bits"),
        (["--freeze-encoder"], "--freeze-encoder needs --load-encoder"),
        (["--obs", "state", "--freeze-encoder"], "--load-encoder needs --obs pixels"),
        (["--resume", "runs/x", "--benchmark"], "--benchmark cannot be given with --resume"),
        (["--resume", ""], "--resume is empty"),
        (["--decoder", "none", "--ae-grad", "separate"], "--ae-grad separate"),
        (["--actor-log-std-min", "nan"], "--actor-log-std-min"),
        (["--actor-log-std-max", "inf"], "--actor-log-std-max: must be a finite number"),
        (["--actor-log-std-min", "3"], "--actor-log-std-min is not below"),
        (["--actor-log-std-min", "2"], "--actor-log-std-min is not below"),  # max's default
        (["--vae-beta", "inf"], "--vae-beta"),
        (["--init-temperature", "inf"], "--init-temperature"),
        (["--critic-lr", "nan"], "--critic-lr"),
        (["--device", "cuda:x"], "--device"),
        (["--benchmark", "--bench-updates", "3"], "--bench-updates must be even"),
        (["--plot", os.path.join(HERE, "README.md")], "no eval.csv of sac_ae.py (KeyError"),
        (["--plot", os.path.join(HERE, "no-such.csv")], "(FileNotFoundError"),
        (["--plot", "SHORT_ROW"], "no eval.csv of sac_ae.py (TypeError"),
        (["--no-such-flag"], "unrecognized"),
    ]
    + (
        [(["--device", "cuda"], "CUDA device(s) are visible")]
        if not torch.cuda.is_available()
        else []
    ),
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    tmp_path, capsys, monkeypatch, argv, needle
):
    def accepted(*a):  # a run that starts after all: fail now, not after a whole default run
        raise AssertionError(f"{argv} was accepted")

    monkeypatch.setattr(sac_ae.DMCEnv, "step", accepted)
    if "SHORT_ROW" in argv:  # an eval.csv cut in its last row
        short = tmp_path / "eval.csv"
        short.write_text("env_step,episode_return_mean,episode_return_std\n0,1,0\n10,5\n")
        argv = [str(short) if a == "SHORT_ROW" else a for a in argv]
    out = tmp_path / "never"
    modes = {"--resume", "--plot"} & set(argv)  # these refuse an --out-dir first
    assert exit_code(argv if modes else [*argv, "--out-dir", str(out)]) == 2
    assert needle in one_line_error(capsys)
    assert not out.exists()


def test_the_edges_of_each_checked_range_are_accepted(tmp_path, monkeypatch):
    (tmp_path / "enc").mkdir()
    exported_agent(tmp_path / "enc")
    monkeypatch.chdir(tmp_path)  # a relative --load-encoder is kept as the absolute path
    edges = ["--gamma", "1", "--critic-tau", "1", "--ae-bits", "8", "--keep-checkpoints", "0",
             "--image-size", "15", "--decoder-latent-lambda", "0",
             "--load-encoder", "enc", "--seed", "4294957295"]  # fmt: skip
    args = sac_ae.parse_args(edges)
    assert (args.gamma, args.critic_tau, args.ae_bits, args.keep_checkpoints) == (1, 1, 8, 0)
    assert args.seed == 2**32 - 1 - sac_ae.EVAL_SEED_OFFSET  # the evaluation's seed fits too
    assert (args.image_size, args.decoder_latent_lambda) == (15, 0)
    assert args.load_encoder == str(tmp_path / "enc")


def test_main_filters_mujocos_deprecation_lines_from_absl_and_keeps_the_rest(capsys):
    assert exit_code(["--domain", "chetah"]) == 2

    def record(text):
        return logging.LogRecord("absl", logging.WARNING, __file__, 1, text, None, None)

    absl = logging.getLogger("absl")
    assert not absl.filter(record("'settotalmass' is deprecated"))
    assert absl.filter(record("MuJoCo version mismatch"))


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    argv = [sys.executable, SCRIPT, "--domain", "chetah", "--out-dir", str(tmp_path / "x")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=HERE)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr and not (tmp_path / "x").exists()


def test_existing_non_empty_out_dir_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert exit_code(["--out-dir", str(tmp_path)]) == 2
    assert "not empty" in one_line_error(capsys)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_out_dir_that_cannot_be_made_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for out, needle in ((tmp_path / "file" / "run", "a file"), ("", "--out-dir is empty"),
                        (tmp_path / "file", "is a file"),
                        (tmp_path / "dangling", "is a link to nothing")):  # fmt: skip
        assert exit_code(["--domain", "cartpole", "--task", "swingup", "--out-dir", str(out)]) == 2
        assert needle in one_line_error(capsys)


def test_read_only_out_dir_is_refused_before_work(tmpfs, capsys):
    read_only = tmpfs("ro,size=1m")
    argv = ["--domain", "cartpole", "--task", "swingup", "--out-dir", str(read_only / "r")]
    assert exit_code(argv) == 2 and "read-only" in one_line_error(capsys)


def test_image_size_beyond_the_offscreen_buffer_is_one_line(tmp_path, capsys):
    argv = ["--domain", "cartpole", "--task", "swingup", "--image-size", "1000"]
    assert exit_code([*argv, "--out-dir", str(tmp_path / "run")]) == 2
    assert "renders up to 640x480" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_networks_too_large_for_memory_are_one_line(tmp_path, capsys):
    tiny_run(tmp_path / "r", "--hidden-dim", "2000000", code=1)
    assert "out of memory" in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_a_replay_larger_than_the_free_host_memory_is_one_line(tmp_path, monkeypatch, capsys):
    def meminfo(path, *a, **k):  # 1 GiB available
        if path == "/proc/meminfo":
            return io.StringIO("MemTotal: 8388608 kB\nMemAvailable: 1048576 kB\n")
        return open(path, *a, **k)

    def accepted(*a, **k):  # else it would train a whole default run
        raise AssertionError("a replay of 1.2 GiB was accepted with 1 GiB free")

    monkeypatch.setattr(sac_ae, "open", meminfo, raising=False)
    monkeypatch.setattr(sac_ae, "SACAE", accepted)
    argv = ["--domain", "cartpole", "--task", "swingup", "--buffer-size", "100000", "--device"]
    assert exit_code([*argv, "cpu", "--out-dir", str(tmp_path / "run")]) == 2
    line = one_line_error(capsys)  # 500k env steps are 62,500 agent steps at cartpole's repeat 8
    assert "the replay needs 1.2 GiB, 1.0 free: lower --buffer-size" in line
    assert not (tmp_path / "run").exists()


def test_load_encoder_and_action_repeat_mistakes_are_one_line(tmp_path, capsys):
    argv = ["--domain", "cartpole", "--task", "swingup", "--out-dir", str(tmp_path / "run")]
    assert exit_code([*argv, "--load-encoder", str(tmp_path)]) == 2  # a folder without model.pt
    assert "no model.pt in it" in one_line_error(capsys)
    assert exit_code([*argv, "--action-repeat", "1001"]) == 2
    assert "longer than cartpole-swingup's episodes" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("gl", ["disable", "glfw"])  # glfw: no display here
def test_no_renderer_is_the_whole_of_stderr_before_the_run_folder(tmp_path, gl):
    out = tmp_path / "run"
    argv = [sys.executable, SCRIPT, "--domain", "cartpole", "--task", "swingup", "--obs", "state",
            "--save-video", "--out-dir", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "DISPLAY"}
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                            env={**env, "MUJOCO_GL": gl}, cwd=HERE)  # fmt: skip
    assert result.returncode == 1  # no GLFW warnings, no "Exception ignored in: MjrContext.__del__"
    assert f"rendering with MUJOCO_GL={gl} failed" in only_line(result.stderr)
    assert not out.exists()


def test_a_flag_that_may_change_on_resume_is_known_by_its_heading_in_help():
    # No hand-kept list: the checkpoint's configuration check is every flag but those two
    # headings' (a new flag under any other heading is part of it at once).
    args = sac_ae.parse_args(["--domain", "cartpole", "--task", "swingup"])
    config = sac_ae.maths_config(args)
    assert {"total_steps", "device", "out_dir", "resume", "save_video"}.isdisjoint(config)
    assert {"critic_lr", "batch_size", "decoder", "seed", "precision"} <= set(config)
    assert "--checkpoint-freq" in sac_ae.build_parser().format_help().split(sac_ae.RESUMABLE)[1]


# ---------------------------------------------------------------------------- whole runs
@slow
def test_pixel_run_writes_its_run_folder(reference_run):
    config = json.loads((reference_run / "config.json").read_text())
    assert config["action_repeat"] == 8 and config["decoder"] == "pixel"
    assert config["versions"]["mujoco"] and config["device_resolved"] == "cpu"
    assert config["replay_capacity"] == 75  # --buffer-size capped at the run's agent steps
    evals = read_csv(reference_run / "eval.csv")
    assert [int(r["env_step"]) for r in evals] == [0, 400, 600]
    assert [int(r["agent_step"]) for r in evals] == [0, 50, 75]
    train = read_csv(reference_run / "train.csv")
    assert int(train[-1]["env_step"]) == 600
    assert int(train[-1]["updates"]) == 30 + 44  # a burst of 30 at agent step 30, then 31..74
    assert float(train[-1]["critic_loss"]) > 0 and float(train[-1]["ae_loss"]) > 0
    recon = sorted(os.listdir(reference_run / "recon"))
    assert recon == ["eval_0.png", "eval_400.png", "eval_600.png"]
    import imageio.v2 as imageio

    for name in recon:  # the stacked frames above: 10 steps into an episode, three different
        picture = imageio.imread(reference_run / "recon" / name)
        assert picture.shape == (2 * 32, 3 * 32, 3)
        frames = [picture[:32, 32 * j : 32 * (j + 1)] for j in range(3)]
        assert not any(np.array_equal(a, b) for a, b in zip(frames, frames[1:])), name
    assert {"probe_r2", "probe_r2_position", "probe_r2_velocity"} <= set(evals[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(reference_run / "tb")).Reload()
    tags = {"charts/episodic_return", "charts/SPS", "losses/qf_loss", "losses/actor_loss",
            "losses/ae_loss", "eval/return", "eval/probe_r2"}  # fmt: skip
    assert tags <= set(tb.Tags()["scalars"]) and tb.Tags()["images"] == ["eval/reconstruction"]
    assert [e.step for e in tb.Scalars("eval/return")] == [0, 400, 600]


@slow
def test_save_video_records_the_first_episode_of_each_evaluation(tmp_path):
    import imageio.v2 as imageio

    out = tiny_run(tmp_path / "run", "--save-video", "--eval-episodes", "2", obs="state",
                   total_steps=200)  # fmt: skip
    assert [r["episodes"] for r in read_csv(out / "eval.csv")] == ["2", "2"]
    assert sorted(os.listdir(out / "video")) == ["eval_0.mp4", "eval_200.mp4"]
    for name in ("eval_0.mp4", "eval_200.mp4"):  # one frame an agent step, of one episode
        frames = imageio.mimread(out / "video" / name, memtest=False)
        assert len(frames) == 125 and frames[0].shape == (256, 256, 3)


@slow
def test_baselines_and_paper_variants_run_and_readme_snippet_loads_their_weights(
    tmp_path, reference_run, state_reference
):
    vae_iter = ["--decoder", "vae", "--ae-grad", "separate", "--ae-update-freq", "2"]
    transfer = ["--domain", "cartpole", "--task", "balance", "--decoder", "none",
                "--load-encoder", str(reference_run), "--freeze-encoder"]  # fmt: skip
    # SAC:state (the state reference run), and SAC:pixel (--decoder none) as the transfer run
    runs = {"state": state_reference}
    for name, argv in {"vae_iter": vae_iter, "transfer": transfer}.items():
        runs[name] = tiny_run(tmp_path / name, *argv, total_steps=400, obs="pixels")
    for name, out in runs.items():
        train = read_csv(out / "train.csv")
        assert float(train[-1]["critic_loss"]) > 0
        assert (train[-1]["ae_loss"] == "") == (name != "vae_iter")
        evaluated = [row["env_step"] for row in read_csv(out / "eval.csv")]
        assert evaluated[0] == "0" and evaluated[-1] == train[-1]["env_step"]  # and at the end
        assert np.isfinite(run_readme_snippet(out)["action"]).all()
    assert json.loads((state_reference / "config.json").read_text())["frame_stack"] == 1
    given = torch.load(reference_run / "model.pt", weights_only=True)["agent"]
    kept = torch.load(runs["transfer"] / "model.pt", weights_only=True)["agent"]
    convs = [k for k in given if k.startswith("encoder.")]
    assert convs and all(torch.equal(kept[k], given[k]) for k in convs)  # loaded, then frozen


def run_readme_snippet(run_dir):
    """Execute README.md's model.pt snippet, as printed there, on run_dir; return its namespace."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = f.read().split("```python\n")[1:]
    snippet = [b.split("```")[0] for b in blocks if "RUN_DIR/model.pt" in b]
    assert len(snippet) == 1, "README.md should hold one python block loading RUN_DIR/model.pt"
    namespace = {}
    exec(snippet[0].replace("RUN_DIR", str(run_dir)), namespace)
    return namespace


def test_model_pt_keeps_the_flags_of_the_maths_and_no_others(reference_run):
    config = json.loads((reference_run / "config.json").read_text())
    args = sac_ae.parse_args(["--resume", str(reference_run)])
    saved = torch.load(reference_run / "model.pt", weights_only=True)["config"]
    assert saved == sac_ae.maths_config(args) and saved["image_size"] == config["image_size"] == 32
    assert "total_steps" not in saved and "out_dir" not in saved and "decoder" in saved


@slow
def test_readme_model_snippet_acts_with_the_exported_weights(reference_run):
    ns = run_readme_snippet(reference_run)
    assert ns["action"].shape == (1,) and np.isfinite(ns["action"]).all()
    weights = torch.load(reference_run / "model.pt", weights_only=True)["agent"]
    assert torch.equal(ns["agent"].actor.policy[0].weight, weights["actor.policy.0.weight"])


@slow
def test_plot_draws_one_figure_of_several_runs_in_their_common_folder(tmp_path, reference_run):
    for seed in ("s1", "s2"):  # two seeds of one configuration: one curve, their mean and spread
        (tmp_path / seed).mkdir()
        for name in ("eval.csv", "config.json"):
            shutil.copy(reference_run / name, tmp_path / seed / name)
    (tmp_path / "s2" / "eval.csv").write_text(
        (tmp_path / "s2" / "eval.csv").read_text().replace("163.444", "263.444")
    )
    assert (
        exit_code(["--plot", str(tmp_path / "s1" / "eval.csv"), str(tmp_path / "s2" / "eval.csv")])
        is None
    )
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    assert not (tmp_path / "s1" / "learning_curve.png").exists()
    assert sac_ae.run_label(str(tmp_path / "s1" / "eval.csv")) == "cartpole-swingup, SAC+AE"


def test_plot_draws_the_mean_a_band_of_the_spread_and_the_published_points(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn, axes = [], matplotlib.axes.Axes

    def recorded(draw):
        @functools.wraps(draw)
        def recording(ax, *a, **k):
            drawn.append(a)
            return draw(ax, *a, **k)

        return recording

    monkeypatch.setattr(axes, "plot", recorded(axes.plot))
    monkeypatch.setattr(axes, "fill_between", recorded(axes.fill_between))
    config = json.dumps(dict(domain="cheetah", task="run", obs="pixels", decoder="pixel"))
    runs = {"s1": "0,10,2\n100000,300,4\n", "s2": "0,20,6\n50000,1,1\n100000,500,8\n"}
    for seed, rows in runs.items():  # s2's evaluation at 50000 is not in s1: left out
        (tmp_path / seed).mkdir()
        (tmp_path / seed / "config.json").write_text(config)
        header = "env_step,episode_return_mean,episode_return_std\n"
        (tmp_path / seed / "eval.csv").write_text(header + rows)
    for seeds, mean, low, high in [
        (["s1", "s2"], [15, 400], [10, 300], [20, 500]),  # the std across the runs
        (["s1"], [10, 300], [8, 296], [12, 304]),  # one run: the std across its episodes
    ]:
        drawn.clear()
        assert exit_code(["--plot", *(str(tmp_path / s / "eval.csv") for s in seeds)]) is None
        (x, y, _), (bx, blow, bhigh), (px, py, _) = drawn
        assert list(x) == list(bx) == [0, 100000] and list(y) == mean
        assert list(blow) == low and list(bhigh) == high
        assert (list(px), list(py)) == ([1e5, 5e5, 1e5, 5e5], [240, 544, 267, 550])  # DrQ, CURL


def test_plot_refuses_other_flags_an_empty_csv_and_titles_by_folder_without_config(
    tmp_path, capsys
):
    csv_path = tmp_path / "eval.csv"
    csv_path.write_text("env_step,agent_step,episode_return_mean,episode_return_std\n")
    assert exit_code(["--plot", str(csv_path)]) == 2 and "no evaluation rows" in one_line_error(
        capsys
    )
    csv_path.write_text("env_step,episode_return_mean,episode_return_std\n0,1,0\n10,5,1\n")
    for extra in (
        ["--benchmark"],
        ["--resume", "runs/x"],
        ["--total-steps", "5"],
        ["--seed", "2"],
        ["--out-dir", str(tmp_path / "out")],
    ):
        assert exit_code(["--plot", str(csv_path), *extra]) == 2
        assert "no effect: --plot only draws" in one_line_error(capsys)
    (tmp_path / "config.json").write_text("{bad")
    assert sac_ae.run_label(str(csv_path)) == tmp_path.name
    assert exit_code(["--plot", str(csv_path)]) is None
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000


# ---------------------------------------------------------------------------- checkpoints, resume
KILLED_IN_SAVE = """import os, signal, sys, sac_ae
save, calls = sac_ae.torch.save, []
def killed(*a, **k):  # SIGKILL at the start of torch.save number argv[1]
    calls.append(1)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return save(*a, **k)
sac_ae.torch.save = killed
sys.exit(sac_ae.main(sys.argv[2:]))
"""


@slow
def test_sigkill_while_a_checkpoint_is_written_then_resume_equals_uninterrupted_run(
    tmp_path, state_reference
):
    # In the checkpoint at env step 400, mid-episode: its replay chunk is on disk, its .pt not.
    out = tmp_path / "run"
    argv = [*STATE_RUN, "--out-dir", str(out)]
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_SAVE, "2", *argv], cwd=HERE,
                            capture_output=True, text=True)  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [step for step, _, _ in sac_ae.checkpoints(str(out))] == [200]
    assert len(sac_ae.checkpoints(str(out), sac_ae.CHUNKS)) == 2  # the second chunk is 400's
    assert_same_run(resume(out), state_reference)
    # The killed process's events after step 200 are purged: each point once, as in one run.
    assert tensorboard_steps(out) == tensorboard_steps(state_reference)


@slow
def test_sigint_writes_a_checkpoint_and_the_run_resumes_identically(
    tmp_path, state_reference, capsys, monkeypatch
):
    signal_after(monkeypatch, sac_ae, "evaluate", calls=2)  # right after the evaluation at 400
    out = tiny_run(tmp_path / "run", obs="state", code=130)
    assert f"resume with: python {sys.argv[0]} --resume {out}" in capsys.readouterr().out
    monkeypatch.undo()
    assert_same_run(resume(out), state_reference)
    assert tensorboard_steps(out) == tensorboard_steps(state_reference)  # 400's kept


@slow
def test_sigint_in_the_burst_stops_within_an_update_and_resumes_identically(tmp_path, monkeypatch):
    reference = tiny_run(tmp_path / "reference", total_steps=300, init_updates=150, obs="state")
    original, count = sac_ae.SACAE.update, [0]

    def update(self, batch, step):
        count[0] += step == 30  # the burst's updates all run at agent step --init-steps
        if count[0] == 100 and step == 30:  # the 100th of the burst's 150 updates
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, batch, step)

    monkeypatch.setattr(sac_ae.SACAE, "update", update)
    out = tiny_run(tmp_path / "run", total_steps=300, init_updates=150, obs="state", code=130)
    monkeypatch.undo()
    state = torch.load(sac_ae.checkpoints(str(out))[-1][2], weights_only=False)["state"]
    assert state["updates"] == 100 and state["agent_step"] == 30 and state["action"] is not None
    assert_same_run(resume(out), reference)


@slow
def test_resume_extends_a_finished_run_to_the_same_files_as_one_run(tmp_path):
    stacked = ["--frame-stack", "3"]  # stacks of 3 in the growing ring, as pixels, unrendered
    whole = tiny_run(tmp_path / "whole", *stacked, obs="state")
    out = tiny_run(tmp_path / "run", *stacked, total_steps=400, obs="state")
    # A crash between writing and renaming the next checkpoint leaves a .tmp.
    (out / "checkpoints" / "ckpt_0000000600_000000000076.pt.tmp").write_bytes(b"partial")
    resume(out, "--total-steps", "600")
    assert json.loads((out / "config.json").read_text())["total_steps"] == 600
    # Its replay ring grew with the run (50 -> 75 agent steps), and the episode that the first
    # run's end cut is logged whole: the same run as one of 600 steps, row for row.
    assert_same_run(out, whole)


@slow
def test_a_total_that_the_last_agent_step_overshot_is_accepted_on_resume(tmp_path, state_reference):
    out = shutil.copytree(state_reference, tmp_path / "run")  # at env step 600, 75 steps of 8
    resume(out, "--total-steps", "596")  # a 596-step run ends at 600 too
    assert_same_run(out, state_reference)


@slow
def test_resume_of_a_finished_run_writes_model_pt_again(tmp_path, reference_run):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    (out / "model.pt").unlink()  # as a full disk left it
    assert_same_run(resume(out), reference_run)


@slow
def test_a_checkpoint_of_capturable_adam_resumes_here_as_this_run_needs(tmp_path, state_reference):
    out = tiny_run(tmp_path / "run", total_steps=400, obs="state")
    path = sac_ae.checkpoints(str(out))[-1][2]
    payload = torch.load(path, weights_only=False)
    for state in payload["optimizers"].values():  # as a run with CUDA graphs writes them
        for group in state["param_groups"]:
            group["capturable"] = True
    torch.save(payload, path)
    resume(out, "--total-steps", "600")
    payload = torch.load(sac_ae.checkpoints(str(out))[-1][2], weights_only=False)
    groups = [g for state in payload["optimizers"].values() for g in state["param_groups"]]
    assert len(groups) == 3 and not any(g["capturable"] for g in groups)  # critic, actor, alpha
    assert_same_run(out, state_reference)


def damaged_resume_is_refused(tmp_path, reference_run, capsys, damage, which=-1):
    """Damage a checkpoint file of a copy of the reference run, resume: the one-line refusal,
    the folder unchanged."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    path = sorted((out / "checkpoints").glob(damage[0]))[which]
    path.write_bytes(damage[1](path, path.read_bytes()))
    before = folder_digest(out)
    assert exit_code(["--resume", str(out), "--total-steps", "2000"]) == 2
    assert folder_digest(out) == before
    return one_line_error(capsys)


def flip_a_tensor_byte(path, data):
    """The file with one bit flipped in the middle of its largest member's data."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        member = max(z.infolist(), key=lambda i: i.file_size)
    data, header = bytearray(data), member.header_offset
    name_len = int.from_bytes(data[header + 26 : header + 28], "little")
    extra_len = int.from_bytes(data[header + 28 : header + 30], "little")
    data[header + 30 + name_len + extra_len + member.file_size // 2] ^= 0x01
    return bytes(data)


@slow
def test_truncated_checkpoint_is_refused_and_the_folder_left_as_it_was(
    tmp_path, reference_run, capsys
):
    line = damaged_resume_is_refused(
        tmp_path, reference_run, capsys, ("ckpt_*.pt", lambda _, b: b[: len(b) // 2])
    )
    assert "is damaged" in line and "move it aside to resume from ckpt_0000000400" in line


@slow
def test_checkpoint_with_a_flipped_byte_is_refused_and_changes_nothing(
    tmp_path, reference_run, capsys
):
    line = damaged_resume_is_refused(
        tmp_path, reference_run, capsys, ("ckpt_*.pt", flip_a_tensor_byte)
    )
    assert "CRC" in line


@slow
def test_a_damaged_replay_chunk_that_every_checkpoint_needs_says_the_run_cannot_resume(
    tmp_path, reference_run, capsys
):
    line = damaged_resume_is_refused(
        tmp_path, reference_run, capsys, ("replay_*.npz", flip_a_tensor_byte), which=0
    )
    assert "CRC" in line and "none older can: start again" in line


@slow
def test_a_lost_newest_replay_chunk_points_to_the_checkpoint_before_it(
    tmp_path, reference_run, capsys
):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    sorted((out / "checkpoints").glob("replay_*.npz"))[-1].unlink()
    before = folder_digest(out)
    assert exit_code(["--resume", str(out), "--total-steps", "2000"]) == 2
    line = one_line_error(capsys)
    assert "which no chunk holds" in line and "resume from ckpt_0000000400" in line
    assert folder_digest(out) == before


@slow
def test_a_checkpoint_at_an_evaluation_step_holds_that_evaluation(
    tmp_path, state_reference, capsys
):
    out = tmp_path / "run"
    shutil.copytree(state_reference, out)
    sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1].unlink()  # resume from ckpt 400
    capsys.readouterr()
    resume(out)
    printed = capsys.readouterr().out
    assert "[resume] ckpt_0000000400" in printed  # evaluated, then checkpointed: not done again
    assert "of the burst to go" not in printed  # the one update of this agent step is no burst
    assert "[eval] env_step 400 " not in printed and "[eval] env_step 600 " in printed
    assert_same_run(out, state_reference)


def test_the_progress_bar_on_a_terminal_counts_env_steps(tmp_path, monkeypatch, capsys):
    counted, log_episode = [], sac_ae.Run.log_episode

    def counting(run):
        log_episode(run)
        counted.append((run.bar.disable, run.bar.n, run.bar.total, run.state.env_step))

    monkeypatch.setattr(sac_ae.Run, "log_episode", counting)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    tiny_run(tmp_path / "run", obs="state", total_steps=2000, eval_freq=2000)
    assert counted == [(False, 1000, 2000, 1000), (False, 2000, 2000, 2000)]
    assert "2000/2000" in capsys.readouterr().err  # tqdm's line, on stderr


@pytest.fixture(scope="module")
def wrapped_ring(tmp_path_factory):
    """--buffer-size 12 of 75 agent steps: the ring (15 slots: 12 transitions, a first frame, two
    to spare) wraps between the checkpoints, every 100 env steps (the first agent step past each);
    --keep-checkpoints 2 keeps the last three: [(env_step, slots, path)], [(start, end, path)]."""
    a = tiny_run(tmp_path_factory.mktemp("wrapped") / "a", "--buffer-size", "12",
                 "--keep-checkpoints", "2", obs="state", checkpoint_freq=100)  # fmt: skip
    return a, sac_ae.checkpoints(a), sac_ae.checkpoints(a, sac_ae.CHUNKS)


def test_a_chunk_holds_no_more_slots_than_the_ring(tmp_path):
    # --buffer-size 12: a ring of 15 slots, written over 25 agent steps between two checkpoints
    out = tiny_run(tmp_path / "run", "--buffer-size", "12", obs="state")
    chunks = sac_ae.checkpoints(out, sac_ae.CHUNKS)
    assert chunks and all(end - start <= 15 for start, end, _ in chunks)
    for start, end, path in chunks:
        with np.load(path) as data:
            assert len(data["frames"]) == len(data["age"]) == end - start


@slow
def test_a_resume_removes_the_chunks_written_after_its_checkpoint(tmp_path, state_reference):
    out = shutil.copytree(state_reference, tmp_path / "run")
    sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1].unlink()  # resume from ckpt 400
    slots = sac_ae.checkpoints(out)[-1][1]
    assert slots in [start for start, _, _ in sac_ae.checkpoints(out, sac_ae.CHUNKS)]
    with sac_ae.Run(sac_ae.parse_args(["--resume", str(out)])):  # restored, not trained
        ends = [end for _, end, _ in sac_ae.checkpoints(out, sac_ae.CHUNKS)]
    assert max(ends) == slots  # what comes after, the resumed run writes itself


@slow
def test_a_wrapped_ring_keeps_the_chunks_its_kept_checkpoints_need(tmp_path, wrapped_ring, capsys):
    a, found, chunks = wrapped_ring
    assert [step for step, _, _ in found] == [400, 504, 600]
    need = found[0][1] - 15  # the oldest slot that the oldest kept checkpoint's ring holds
    # The chunks before it are gone, not the one that holds it, though it ends within 3 slots of
    # it (the ring holds more slots than transitions).
    assert chunks[0][0] <= need < chunks[0][1] <= need + 3
    b = shutil.copytree(a, tmp_path / "b")
    names = [os.path.basename(path) for _, _, path in found]
    (b / "checkpoints" / names[2]).write_bytes(b"")  # the newest damaged: the next is offered
    before = folder_digest(b)
    assert exit_code(["--resume", str(b)]) == 2 and folder_digest(b) == before
    assert f"move it aside to resume from {names[1]}" in one_line_error(capsys)
    for name in names[1:]:  # moved aside: the oldest resumes to the same files as one run
        (b / "checkpoints" / name).unlink()
    assert_same_run(a, resume(b))


@slow
def test_a_lost_middle_chunk_points_to_a_checkpoint_from_before_the_gap(
    tmp_path, wrapped_ring, capsys
):
    a, found, chunks = wrapped_ring
    b = shutil.copytree(a, tmp_path / "b")
    lost = [c for c in chunks if c[0] == found[0][1]][0]  # the slots after ckpt 400's
    (b / "checkpoints" / os.path.basename(lost[2])).unlink()
    assert exit_code(["--resume", str(b)]) == 2
    line, names = one_line_error(capsys), [os.path.basename(path) for _, _, path in found]
    assert "which no chunk holds" in line and f"move it aside to resume from {names[0]}" in line
    for name in names[1:]:  # the one offered has all it needs
        (b / "checkpoints" / name).unlink()
    assert_same_run(a, resume(b))


@slow
@pytest.mark.parametrize("setup,argv,needle", [
    ("missing", [], "is no folder"),
    ("empty", [], "has no config.json"),
    ("no_ckpt", [], "has no checkpoint"),
    ("ok", ["--batch-size", "16"], "--batch-size cannot be given with --resume"),
    ("ok", ["--out-dir", "elsewhere"], "--out-dir cannot be given with --resume"),
    ("ok", ["--total-steps", "400"], "--total-steps 400: the run is already at env step 600"),
    ("ok", ["--total-steps", "592"], "already at env step 600"),  # 592 + one action repeat
    ("edited", [], "config.json says critic_lr 0.5, but the checkpoint was trained with 0.001"),
    ("corrupt", [], "config.json is damaged"),
    ("metric", [], "run is a run of another sac_ae.py: resume with that one"),
    ("format", [], "run is a run of another sac_ae.py: resume with that one"),
])  # fmt: skip
def test_bad_resume_is_one_line_exit_2_and_changes_nothing(
    tmp_path, reference_run, capsys, monkeypatch, setup, argv, needle
):
    out = tmp_path / "run"
    if setup != "missing":
        out.mkdir()
    if setup not in ("missing", "empty"):
        shutil.copy(reference_run / "config.json", out / "config.json")
    if setup in ("ok", "edited", "corrupt", "metric", "format"):
        shutil.copytree(reference_run / "checkpoints", out / "checkpoints")
        for name in ("eval.csv", "train.csv"):
            shutil.copy(reference_run / name, out / name)
    if setup == "edited":
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**config, "critic_lr": 0.5}))
    if setup == "corrupt":
        (out / "config.json").write_text("{not json")
    if setup == "metric":  # the code logs one more metric than when the run began
        monkeypatch.setattr(sac_ae, "TRAIN_FIELDS", [*sac_ae.TRAIN_FIELDS, "grad_norm"])
    if setup == "format":  # a sac_ae.py whose checkpoints are laid out otherwise
        monkeypatch.setattr(sac_ae, "CHECKPOINT_FORMAT", sac_ae.CHECKPOINT_FORMAT + 1)
    before = folder_digest(out) if out.exists() else None
    assert exit_code(["--resume", str(out), *argv]) == 2
    assert needle in one_line_error(capsys)
    assert (folder_digest(out) if out.exists() else None) == before


@slow
def test_a_run_folder_on_a_read_only_disk_is_refused_on_resume(tmpfs, state_reference, capsys):
    disk = tmpfs("size=16m")
    shutil.copytree(state_reference, disk / "run")
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True, capture_output=True)
    before = folder_digest(disk / "run")
    assert exit_code(["--resume", str(disk / "run"), "--total-steps", "608"]) == 2
    assert f"--resume {disk / 'run'} is read-only" in one_line_error(capsys)
    assert folder_digest(disk / "run") == before


@slow
def test_a_run_resumes_with_the_default_of_a_flag_newer_than_it(tmp_path, state_reference):
    out = tmp_path / "run"
    shutil.copytree(state_reference, out)
    config = json.loads((out / "config.json").read_text())
    del config["ae_bits"]  # as if written before --ae-bits existed
    (out / "config.json").write_text(json.dumps(config))
    resume(out, "--total-steps", "608")  # one agent step more
    assert json.loads((out / "config.json").read_text())["ae_bits"] == 5


@slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_while_a_checkpoint_is_written_says_what_is_on_disk(
    tmp_path, monkeypatch, capsys, sig
):
    signal_after(monkeypatch, sac_ae.torch, "save", calls=2, sig=sig, times=2)  # in the 2nd
    out = tiny_run(tmp_path / "run", obs="state", code=128 + sig)
    line = one_line_error(capsys)
    found = sac_ae.checkpoints(str(out))
    assert f"a second {signal.Signals(sig).name}" in line and not list(out.rglob("*.tmp"))
    assert [step for step, _, _ in found] == [200] and f"{found[0][2]} is intact" in line
    torch.load(found[0][2], weights_only=False)  # complete and loadable


@slow
def test_a_signal_during_an_evaluation_cuts_it_short_and_resume_redoes_it(
    tmp_path, state_reference, monkeypatch
):
    original, calls = sac_ae.SACAE.act, []

    def act(self, obs, deterministic=False):
        if deterministic:  # the evaluation at env step 400 is the second (episodes of 125 steps)
            calls.append(len(calls))
            if len(calls) == 125 + 50:
                os.kill(os.getpid(), signal.SIGTERM)
        return original(self, obs, deterministic)

    monkeypatch.setattr(sac_ae.SACAE, "act", act)
    out = tiny_run(tmp_path / "run", obs="state", code=143)
    assert len(calls) == 125 + 50  # not one more action: the evaluation stopped there
    assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0"]
    monkeypatch.undo()
    assert_same_run(resume(out), state_reference)  # the cut evaluation was redone from its start


def test_a_second_signal_while_rendering_or_loading_is_not_taken_for_a_fault(monkeypatch):
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=16, action_repeat=8)

    def signalled(*a, **k):
        raise sac_ae.Interrupted(signal.SIGINT)

    monkeypatch.setattr(env.env.physics, "render", signalled)
    with pytest.raises(sac_ae.Interrupted):  # not a RenderError naming MUJOCO_GL
        env.reset()


def test_interrupted_twice_before_any_checkpoint_does_not_offer_resume(
    tmp_path, monkeypatch, capsys
):
    signal_after(monkeypatch, sac_ae.Logs, "path", calls=1, times=2)  # the folder exists by then
    tiny_run(tmp_path / "run", code=130)
    line = one_line_error(capsys)
    assert "no checkpoint was written" in line and "--resume" not in line
    assert f"remove {tmp_path / 'run'} and start again" in line


# ---------------------------------------------------------------------------- faults
def test_a_full_disk_while_torch_save_writes_leaves_no_file_and_reads_as_os_error(tmpfs):
    disk = tmpfs("size=256k")
    with pytest.raises(RuntimeError) as raised:
        with sac_ae.atomic_write(str(disk / "ckpt.pt")) as f:
            torch.save({"weights": torch.zeros(2**18)}, f)  # 1 MiB
    assert os.listdir(disk) == []  # no half-written file, no .tmp
    line, code = sac_ae.explain(raised.value, None)
    assert "No space left on device" in line and "free some space" in line and code == 1


TENSORBOARD_FAILS = """import errno, sys, sac_ae
from tensorboard.summary.writer import record_writer
def full(self, data):  # in TensorBoard's writer thread
    raise OSError(errno.ENOSPC, "No space left on device")
record_writer.RecordWriter.write = full
sys.exit(sac_ae.main(sys.argv[1:]))
"""


@slow
def test_tensorboard_failing_in_its_thread_is_the_one_line_alone(tmp_path):
    argv = [sys.executable, "-c", TENSORBOARD_FAILS, *STATE_RUN, "--out-dir", str(tmp_path / "r")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=HERE)
    assert result.returncode == 1  # no "Exception in thread" traceback before it
    assert "No space left on device; free some space" in only_line(result.stderr)


def test_a_run_folder_deleted_mid_run_is_one_line_saying_so(tmp_path, monkeypatch, capsys):
    out, evaluate = tmp_path / "run", sac_ae.evaluate

    def then_delete_the_folder(*a, **k):
        result = evaluate(*a, **k)
        shutil.rmtree(out)
        return result

    monkeypatch.setattr(sac_ae, "evaluate", then_delete_the_folder)
    tiny_run(out, obs="state", code=1)
    assert one_line_error(capsys).endswith(f"{out} is gone")  # not "free some space"


@slow
def test_a_closed_console_leaves_the_run_going_and_its_folder_whole(tmp_path, state_reference):
    out = tmp_path / "run"
    argv = [sys.executable, SCRIPT, *STATE_RUN, "--out-dir", str(out)]
    run = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE
    )
    assert run.stdout.readline().startswith("[setup]")
    run.stdout.close()  # as `| head -1` does
    assert run.wait(timeout=300) == 0 and run.stderr.read() == ""
    assert_same_run(out, state_reference)


def test_config_json_records_the_device_resolved_and_the_package_versions(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tiny_run(tmp_path / "run", obs="state", total_steps=100, device="auto")
    config = json.loads((out / "config.json").read_text())
    assert (config["device"], config["device_resolved"]) == ("auto", "cpu")
    assert set(config["versions"]) == {"torch", "numpy", "dm_control", "mujoco"}
    assert config["versions"]["torch"] == torch.__version__


def test_main_gives_back_the_signal_handlers_it_took(tmp_path):
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    tiny_run(tmp_path / "run", obs="state", total_steps=100)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    tiny_run(tmp_path / "big", "--image-size", "1000", code=2)  # refused in the set-up
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers


def test_a_fault_while_closing_does_not_hide_the_fault_that_ended_the_run(
    tmp_path, monkeypatch, capsys
):
    def no_space():
        raise OSError(28, "No space left on device")

    def closing_fails(held, taking=sac_ae.stop_on_signal):
        held.callback(no_space)  # closed last: after the run's files
        return taking(held)

    def nan_loss(run):
        raise sac_ae.NonFiniteError("critic_loss became nan at agent step 40")

    monkeypatch.setattr(sac_ae, "stop_on_signal", closing_fails)
    monkeypatch.setattr(sac_ae.Run, "log_episode", nan_loss)
    tiny_run(tmp_path / "run", obs="state", code=1)
    assert "critic_loss became nan at agent step 40; stopped before" in one_line_error(capsys)


def test_each_console_line_is_flushed_as_it_is_said(monkeypatch):
    class Console(io.StringIO):
        flushed = ""

        def flush(self):
            self.flushed = self.getvalue()

    console = Console()
    monkeypatch.setattr(sys, "stdout", console)
    sac_ae.say("[train] env_step 1000")  # a pipe (`| tee`) sees it now, not at the buffer's end
    assert console.flushed == "[train] env_step 1000\n"


def test_a_closed_sys_stdout_is_printed_to_nowhere_once(tmp_path):
    code = """import os, sys, sac_ae
sys.stdout.close()
opened = len(os.listdir("/proc/self/fd"))
for i in range(100):
    sac_ae.say(f"[train] line {i}")
print(len(os.listdir("/proc/self/fd")) - opened, file=sys.stderr)"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "1\n")  # /dev/null, once


def physics_error(text):
    from dm_control.rl.control import PhysicsError

    return PhysicsError(text)


@pytest.mark.parametrize("fault,code,needle", [
    (KeyboardInterrupt(), 130, "interrupted; nothing was written"),
    (OSError(28, "No space left on device", "f"), 1, "writing f failed: No space left on device; "
     "free some space; nothing was written"),
    (OSError(30, "Read-only file system", "f"), 1, "; make the disk writable;"),
    (OSError(13, "Permission denied", "f"), 1, "; fix the permissions;"),
    (OSError(5, "Input/output error", "f"), 1, "; fix that;"),
    (MemoryError(), 1, "out of memory"),
    (physics_error("Physics state is invalid"), 1, "the simulation became unstable (Physics"),
    (ValueError("a bug"), None, None),  # not a fault: main() re-raises it, with its traceback
])  # fmt: skip
def test_each_fault_outside_a_run_has_its_line_and_exit_status(fault, code, needle):
    line, got = sac_ae.explain(fault, None)
    assert got == code and (line is None) == (needle is None)
    assert needle is None or needle in line, line


def test_a_fault_in_a_run_names_its_newest_checkpoint_or_that_no_folder_was_made(tmp_path):
    args = sac_ae.parse_args([*STATE_RUN, "--out-dir", str(tmp_path / "run")])
    assert sac_ae.explain(KeyboardInterrupt(), args) == ("interrupted; nothing was written", 130)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    line, _ = sac_ae.explain(KeyboardInterrupt(), args)
    assert f"no checkpoint was written: remove {tmp_path / 'run'} and start again" in line
    for name in ("ckpt_0000000200_000000000026.pt", "ckpt_0000000400_000000000051.pt"):
        (tmp_path / "run" / "checkpoints" / name).write_bytes(b"")
    line, _ = sac_ae.explain(KeyboardInterrupt(), args)
    assert "the last checkpoint " + str(tmp_path / "run" / "checkpoints" / name) in line


def test_a_file_that_cannot_be_opened_reads_as_not_a_complete_zip(tmp_path):
    with pytest.raises(ValueError, match="not a complete zip file"):
        sac_ae.read_file(str(tmp_path))  # a folder: IsADirectoryError, an OSError
    (tmp_path / "ckpt.pt").write_bytes(b"PK")
    with pytest.raises(ValueError, match="not a complete zip file"):
        sac_ae.read_file(str(tmp_path / "ckpt.pt"))


def test_a_full_disk_while_model_pt_is_written_says_resume_writes_it_again(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "ckpt_0000000600_000000000075.pt").write_bytes(b"")
    full = OSError(28, "No space left on device", str(tmp_path / "model.pt.tmp"))
    args = sac_ae.parse_args(["--domain", "cartpole", "--task", "swingup"])
    args.out_dir = str(tmp_path)
    line, code = sac_ae.explain(full, args)
    assert code == 1 and "ckpt_0000000600_000000000075.pt is intact" in line
    assert line.endswith(f"--resume {tmp_path} (and it writes model.pt again)")


@slow
def test_disk_full_ends_in_one_line_keeps_the_checkpoint_and_the_run_resumes(
    tmpfs, state_reference, capsys, monkeypatch
):
    disk = tmpfs("size=64m")
    out, filler = disk / "run", disk / "filler"
    save = sac_ae.save_checkpoint

    def then_fill_the_disk(*a, **k):
        path = save(*a, **k)
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 2**20)
                f.flush()
        return path

    monkeypatch.setattr(sac_ae, "save_checkpoint", then_fill_the_disk)
    capsys.readouterr()
    tiny_run(out, obs="state", code=1)
    line = one_line_error(capsys)
    assert "No space left on device" in line and "is intact" in line and f"--resume {out}" in line
    assert not list(out.rglob("*.tmp"))
    monkeypatch.undo()
    filler.unlink()
    assert_same_run(resume(out), state_reference)


@slow
def test_nan_loss_stops_the_run_naming_loss_and_step_and_keeps_last_good_checkpoint(
    tmp_path, monkeypatch
):
    original = sac_ae.SACAE.update

    def poisoned(self, batch, step):
        metrics = original(self, batch, step)
        if step == 60:
            metrics["critic_loss"] = metrics["critic_loss"] * float("nan")
        return metrics

    monkeypatch.setattr(sac_ae.SACAE, "update", poisoned)
    args = sac_ae.parse_args([*STATE_RUN, "--out-dir", str(tmp_path / "run")])
    with pytest.raises(sac_ae.NonFiniteError, match=r"critic_loss became nan at agent step 60$"):
        sac_ae.train(args)
    found = sac_ae.checkpoints(str(tmp_path / "run"))
    assert [step for step, _, _ in found] == [200, 400]  # agent step 60 is env step 480
    payload = torch.load(found[-1][2], weights_only=False)
    assert all(torch.isfinite(v).all() for v in payload["agent"].values())
    assert not (tmp_path / "run" / "model.pt").exists()


def test_a_non_finite_parameter_is_never_checkpointed(tmp_path, monkeypatch, capsys):
    save, saved = sac_ae.save_checkpoint, []

    def poisoning(run):  # before the second checkpoint, one number of the largest parameter
        saved.append(run.state.env_step)
        if len(saved) == 2:
            with torch.no_grad():
                max(run.agent.parameters(), key=torch.numel).view(-1)[0] = float("inf")
        return save(run)

    monkeypatch.setattr(sac_ae, "save_checkpoint", poisoning)
    out = tiny_run(tmp_path / "run", obs="state", code=1)
    assert "a parameter became NaN or inf by agent step 50;" in one_line_error(capsys)
    assert [step for step, _, _ in sac_ae.checkpoints(str(out))] == [200]


@slow
def test_nan_action_stops_before_the_simulator_naming_the_loss_and_step(tmp_path, capsys):
    # alpha = exp(log 1e300) is inf in float32: the first update's Bellman target is not finite.
    out = tiny_run(tmp_path / "run", "--init-temperature", "1e300", obs="state", code=1)
    line = one_line_error(capsys)
    assert "critic_loss became" in line and "at agent step 30;" in line
    assert [step for step, _, _ in sac_ae.checkpoints(str(out))] == [200]  # the last good one
    assert f"last checkpoint {sac_ae.checkpoints(str(out))[-1][2]} is intact" in line


def test_nan_action_in_evaluation_is_refused_too():
    agent, args = make_agent(action_dim=1)
    with torch.no_grad():
        agent.actor.policy[-1].bias.fill_(float("nan"))
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=args.image_size, action_repeat=8)
    with pytest.raises(sac_ae.NonFiniteError, match="action became"):
        sac_ae.evaluate(env, agent, episodes=1)


# ---------------------------------------------------------------------------- the paper's variants
def real_batch(args, n=40, batch=4):
    """A batch sampled from a replay buffer of real cartpole pixels and random actions."""
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=args.image_size, action_repeat=8)
    buffer = replay(env.frame_shape, torch.uint8, n, env.episode_length)
    buffer.add_first(env.reset())
    rng = np.random.default_rng(0)
    for _ in range(n):
        action = rng.uniform(-1, 1, env.action_dim).astype(np.float32)
        obs, reward, discount, _, _ = env.step(action)
        buffer.add(action, reward, discount, obs)
    return buffer.sample(batch)


def test_vae_kl_is_zero_only_when_the_posterior_is_the_prior():
    zero = torch.zeros(3, 8)
    assert sac_ae.kl_to_standard_normal(zero, zero).item() == 0
    assert sac_ae.kl_to_standard_normal(zero + 0.1, zero).item() > 0
    assert sac_ae.kl_to_standard_normal(zero, zero - 0.1).item() > 0
    assert sac_ae.kl_to_standard_normal(zero, zero + 0.1).item() > 0
    # summed over the 8 latent dimensions, averaged over the batch: 8 * (2 - 1 - log 2) / 2
    kl = sac_ae.kl_to_standard_normal(zero, torch.full((3, 8), math.log(2))).item()
    assert kl == pytest.approx(4 * (1 - math.log(2)))


def test_vae_reconstructs_a_sampled_latent_while_rl_heads_read_the_mean():
    agent, args = make_agent("--decoder", "vae", "--vae-beta", "0.5", action_dim=1)
    batch = real_batch(args)
    h = features(agent, batch[0])
    assert torch.equal(agent.critic.head(h), agent.critic.head(h))  # the mean: deterministic
    log_var_before = agent.critic.log_var.weight.detach().clone()
    torch.manual_seed(0)
    metrics = agent.update(batch, step=2)
    assert metrics["kl"].item() > 0
    assert not torch.equal(log_var_before, agent.critic.log_var.weight)
    recon, kl = metrics["recon_loss"].item(), metrics["kl"].item()
    assert metrics["ae_loss"].item() == pytest.approx(recon + 0.5 * kl, rel=1e-5)


def test_vae_decoder_reads_the_mean_plus_noise_times_the_posterior_std(monkeypatch):
    # Eq. 4's reparameterisation: z + eps * exp(log_var / 2), std not variance.
    agent, args = make_agent("--decoder", "vae", action_dim=1)
    torch.nn.init.constant_(agent.critic.log_var.bias, 1.0)  # exp(1/2) is far from exp(1)
    obs = random_batch(agent, args)[0]
    h = features(agent, obs)
    z, log_var = agent.critic.head(h).detach(), agent.critic.log_var(h).detach()
    seen = []
    agent.decoder.register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0].detach()))
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.full_like(t, 0.5))  # eps = 0.5
    agent.update_autoencoder(obs, h)
    assert torch.allclose(seen[0], z + 0.5 * (0.5 * log_var).exp())


def test_vae_encoder_learns_the_posterior_variance_through_the_kl(monkeypatch):
    agent, args = make_agent("--decoder", "vae", "--vae-beta", "1")
    decode, kl = agent.decoder.forward, sac_ae.kl_to_standard_normal  # only log_var's path left:
    monkeypatch.setattr(agent.decoder, "forward", lambda z: decode(z.detach()))
    monkeypatch.setattr(sac_ae, "kl_to_standard_normal", lambda mu, lv: kl(mu.detach(), lv))
    pixels = random_batch(agent, args)[0]
    before = snapshot(agent.encoder.parameters())
    agent.update_autoencoder(pixels, agent.encoder(agent.prepare(pixels)))
    assert not same(before, agent.encoder.parameters())


def test_vae_kl_reaches_the_critics_head_through_the_mean_too(monkeypatch):
    agent, args = make_agent("--decoder", "vae")
    seen, kl = [], sac_ae.kl_to_standard_normal

    def spied(mu, log_var):
        seen.append((mu.grad_fn is not None, log_var.grad_fn is not None))
        return kl(mu, log_var)

    monkeypatch.setattr(sac_ae, "kl_to_standard_normal", spied)
    agent.update(random_batch(agent, args), 1)
    assert seen == [(True, True)]  # Eq. 4's KL pulls the posterior's mean to 0, not only its var


def test_separate_ae_grad_critic_leaves_encoder_and_decoder_moves_it():
    agent, args = make_agent("--ae-grad", "separate", action_dim=1)
    batch = real_batch(args)
    before, head = snapshot(agent.encoder.parameters()), snapshot(agent.critic.head.parameters())
    q_before = agent.critic.Q1[0].weight.detach().clone()
    critic_step(agent, batch)
    assert same(before, agent.encoder.parameters()) and same(head, agent.critic.head.parameters())
    assert not torch.equal(q_before, agent.critic.Q1[0].weight)
    agent.update_autoencoder(batch[0], features(agent, batch[0]))
    assert not same(before, agent.encoder.parameters())


def exported_agent(tmp_path, *extra):
    agent, args = make_agent(*extra, action_dim=1)
    agent.update(real_batch(args), step=2)  # weights that are no longer the initial ones
    sac_ae.export_model(agent, str(tmp_path / "model.pt"))
    return agent


def test_load_encoder_copies_encoder_and_heads_exactly(tmp_path):
    source = exported_agent(tmp_path)
    agent, _ = make_agent("--load-encoder", str(tmp_path), action_dim=1)
    sac_ae.load_encoder(agent, str(tmp_path))  # as a new run does (a resumed one has its own)
    for mine, theirs in ((agent.encoder, source.encoder), (agent.encoder_target, source.encoder),
                         (agent.critic.head, source.critic.head),
                         (agent.critic_target.head, source.critic.head),
                         (agent.actor.head, source.actor.head)):  # fmt: skip
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert not torch.equal(agent.critic.Q1[0].weight, source.critic.Q1[0].weight)  # only encoders


def test_load_encoder_refuses_an_encoder_of_another_shape_in_one_line(tmp_path):
    exported_agent(tmp_path)
    agent, _ = make_agent("--num-filters", "8", "--load-encoder", str(tmp_path), action_dim=1)
    with pytest.raises(sac_ae.UsageError, match=r"no encoder for this run in .*size mismatch"):
        sac_ae.load_encoder(agent, str(tmp_path))


def test_load_encoder_refuses_a_state_run_which_has_no_encoder(tmp_path):
    sac_ae.export_model(make_agent("--obs", "state", action_dim=1)[0], str(tmp_path / "model.pt"))
    agent, _ = make_agent(action_dim=1)
    with pytest.raises(sac_ae.UsageError, match=r"a SAC:state run has no encoder to give"):
        sac_ae.load_encoder(agent, str(tmp_path / "model.pt"))


@slow
def test_load_encoder_takes_a_checkpoint_as_well(tmp_path, reference_run):
    path = sac_ae.checkpoints(str(reference_run))[0][2]
    args = sac_ae.parse_args([*TINY_RUN, "--out-dir", str(tmp_path / "x")])
    agent = sac_ae.SACAE((9, 32, 32), 1, torch.device("cpu"), args)
    sac_ae.load_encoder(agent, path)
    saved = torch.load(path, weights_only=False)["agent"]
    for name, value in agent.encoder.state_dict().items():
        assert torch.equal(value, saved["encoder." + name]), name


def test_freeze_encoder_keeps_loaded_weights_fixed_through_training(tmp_path):
    exported_agent(tmp_path)
    agent, args = make_agent("--load-encoder", str(tmp_path), "--freeze-encoder", action_dim=1)
    sac_ae.load_encoder(agent, str(tmp_path))
    frozen = [*agent.encoder.parameters(), *agent.critic.head.parameters(),
              *agent.actor.head.parameters()]  # fmt: skip
    before = snapshot(frozen)
    q_before = agent.critic.Q1[0].weight.detach().clone()
    batch = real_batch(args)
    for step in range(4):
        agent.update(batch, step)
    assert same(before, frozen)
    assert not torch.equal(q_before, agent.critic.Q1[0].weight)


def test_linear_probe_r2_is_near_1_for_a_linear_state_and_near_0_for_noise():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2000, 10))
    linear = latents @ rng.standard_normal((10, 5)) + 0.01 * rng.standard_normal((2000, 5))
    groups = [("position", 2), ("velocity", 3)]
    good = sac_ae.linear_probe(latents, linear, groups)
    assert min(good["probe_r2"], good["probe_r2_position"], good["probe_r2_velocity"]) > 0.99
    noise = sac_ae.linear_probe(latents, rng.standard_normal((2000, 5)), groups)
    assert abs(noise["probe_r2"]) < 0.05
    few = sac_ae.linear_probe(latents[:60], linear[:60], groups)  # 30 frames for 11 coefficients
    assert np.isnan(few["probe_r2"]) and np.isnan(few["probe_r2_velocity"])


def test_linear_probe_counts_the_bias_skips_constant_dimensions_and_scores_held_out_frames():
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((88, 10))  # 11 coefficients with the bias: 44 frames fit them
    states = latents @ rng.standard_normal((10, 3))
    groups = [("position", 2), ("velocity", 1)]
    assert sac_ae.linear_probe(latents, states, groups)["probe_r2"] > 0.99
    assert np.isnan(sac_ae.linear_probe(latents[:86], states[:86], groups)["probe_r2"])  # 43 < 44
    states[:, 2] = 0.5  # a dimension that never varies has no R^2; the others still average
    r2 = sac_ae.linear_probe(latents, states, groups)
    assert r2["probe_r2"] > 0.99 and r2["probe_r2_position"] > 0.99
    assert np.isnan(r2["probe_r2_velocity"])
    # Latents that say nothing, and a state whose held-out half sits 3 std higher: against the
    # held-out frames' own mean, the fitted half's mean explains far less than nothing.
    shifted = rng.standard_normal((2000, 3)) + 3 * (np.arange(2000) >= 1000)[:, None]
    assert sac_ae.linear_probe(rng.standard_normal((2000, 10)), shifted, groups)["probe_r2"] < -5
    offset = latents @ rng.standard_normal((10, 3)) + 5  # far from 0: only the bias column fits it
    assert sac_ae.linear_probe(latents, offset, groups)["probe_r2"] > 0.99


def test_reconstruction_image_puts_the_stacked_frames_above_their_reconstructions():
    obs = np.random.default_rng(0).integers(0, 256, (9, 16, 20), dtype=np.uint8)
    recon = (obs.astype(np.float32) - 0.3) / 255 - 0.5  # rounds to obs; truncated, 1 darker
    picture = sac_ae.reconstruction_image(obs, recon)
    assert picture.shape == (32, 60, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[:16, 20:40], obs[3:6].transpose(1, 2, 0))
    assert np.array_equal(picture[16:], picture[:16])
    beyond = np.where(np.arange(20) % 2, 1.0, -1.0) * np.ones((9, 16, 20), np.float32)
    below = sac_ae.reconstruction_image(obs, beyond)[16:]  # the decoder's output is unbounded
    assert np.array_equal(below[0, :2, 0], [0, 255]) and set(np.unique(below)) == {0, 255}


# ------------------------------------------------------------------------- --benchmark, --compile
def test_benchmark_prints_the_final_line(capsys):
    argv = ["--benchmark", "--bench-updates", "2", "--batch-size", "4", "--image-size", "32",
            "--hidden-dim", "16", "--domain", "cartpole", "--task", "swingup",
            "--device", "cpu"]  # fmt: skip
    assert sac_ae.main(argv) is None
    out = capsys.readouterr().out
    assert "peak memory" in out
    last = out.strip().splitlines()[-1]
    fields = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert last.startswith("benchmark ") and list(fields) == [
        "ms_per_update", "updates_per_s", "env_steps_per_s", "replay_bytes_per_transition",
        "device", "precision"]  # fmt: skip
    assert float(fields["ms_per_update"]) > 0 and float(fields["env_steps_per_s"]) > 0
    ms, per_s = float(fields["ms_per_update"]), float(fields["updates_per_s"])
    assert per_s == pytest.approx(1000 / ms, rel=1e-3)
    # 3,088 bytes a slot (a 32 x 32 frame, action, reward, not-done); 1,264 slots hold 1,250
    # transitions, their 10 episodes' first frames and 4 to spare.
    assert int(fields["replay_bytes_per_transition"]) == round(3088 * 1264 / 1250)
    assert (fields["device"], fields["precision"]) == ("cpu", "fp32")


@slow
@pytest.mark.parametrize("repeat,extra", [("1", ["--compile"]), ("2", [])])
def test_benchmark_times_one_update_and_one_agent_step_on_the_device_asked(
    monkeypatch, capsys, fresh_dynamo, repeat, extra
):
    """On a clock that ticks 10 ms an update (2 of them sampling) and 4 ms an agent step."""
    now, asked, pick = [0.0], [], sac_ae.pick_device

    def clock():
        return now[0]

    def ticking(owner, name, seconds):
        f = getattr(owner, name)

        def ticked(*a):
            now[0] += seconds
            return f(*a)

        monkeypatch.setattr(owner, name, ticked)

    fake = types.SimpleNamespace(time=clock, perf_counter=clock, strftime=sac_ae.time.strftime)
    monkeypatch.setattr(sac_ae, "time", fake)
    ticking(sac_ae.SACAE, "update", 0.008)
    ticking(sac_ae.ReplayBuffer, "sample", 0.002)
    ticking(sac_ae.DMCEnv, "step", 0.004)
    monkeypatch.setattr(sac_ae, "pick_device", lambda name: asked.append(name) or pick("cpu"))
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    argv = ["--benchmark", "--bench-updates", "4", "--batch-size", "4", "--hidden-dim", "16",
            "--obs", "state", "--action-repeat", repeat, "--device", "auto", *extra]  # fmt: skip
    assert sac_ae.main(argv) is None
    out, sps = capsys.readouterr().out, 1000 * int(repeat) / 4
    assert f"10.0 ms per update, 2.0 of it sampling; {sps:.0f} env steps per second" in out
    fields = dict(kv.split("=", 1) for kv in out.strip().splitlines()[-1].split()[1:])
    assert (fields["ms_per_update"], fields["env_steps_per_s"]) == ("10.000", f"{sps:.1f}")
    assert (fields["device"], fields["precision"], asked) == ("cpu", "fp32", ["auto"])


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied: dynamo keys Optimizer.step by the optimizer, so agents
    compiled by earlier tests would push this test's optimizer steps past its recompile limit,
    and they would run uncompiled without a word."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@slow
def test_compiled_run_prints_compile_time_and_resumes(tmp_path, capsys, monkeypatch, fresh_dynamo):
    # The plumbing of --compile: Inductor's C++ code generation (half a minute on a cold cache)
    # is swapped for aot_eager here; the test below checks what Inductor's (scalar) C++ computes.
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    heard, handler = [], logging.Handler(logging.WARNING)  # Dynamo's warnings, on any stream
    handler.emit = heard.append
    monkeypatch.setattr(logging.getLogger("torch._dynamo"), "handlers", [handler])
    out = tiny_run(tmp_path / "run", "--compile", total_steps=400, obs="state")
    printed = capsys.readouterr().out
    assert printed.count("[compile] update with critic, actor, targets: compiled in") == 1
    assert [r.getMessage() for r in heard] == []  # main() filters the one on Adam's hook
    resume(out, "--total-steps", "600")
    assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0", "400", "600"]


@slow
def test_compiled_update_equals_eager_update(fresh_dynamo):
    # Inductor draws its own random numbers unless told to call PyTorch's (fallback_random); with
    # the same draws the compiled kernels differ from eager only in float32 summation order:
    # 1e-5 is a hundredth of one Adam step of lr 1e-3, far below what a wrong computation moves.
    # Scalar C++ (no SIMD) and two conv layers (the loop of layers still runs) halve the cold
    # compile, which is most of this test's time.
    import torch._inductor.config

    tiny = [*without(TINY_RUN, "--device"), "--num-conv-layers", "2"]
    torch.manual_seed(0)
    eager = sac_ae.SACAE((9, 32, 32), 1, torch.device("cpu"), sac_ae.parse_args(tiny))
    torch.manual_seed(0)
    compiled = sac_ae.SACAE(
        (9, 32, 32), 1, torch.device("cpu"), sac_ae.parse_args([*tiny, "--compile"])
    )
    args = eager.args
    for step in (2, 3):  # even (all four parts) and odd (critic and autoencoder)
        batch = random_batch(eager, args, batch=8, action_dim=1, seed=step)
        torch.manual_seed(step)
        expected = eager.update(batch, step)
        torch.manual_seed(step)
        with torch._inductor.config.patch({"fallback_random": True, "cpp.vec_isa_ok": False}):
            got = compiled.update(batch, step)
        for name in expected:
            assert torch.allclose(expected[name], got[name], rtol=1e-5, atol=1e-6), name
    assert len(compiled.compiled) == 2
    for name, value in agent_state(eager).items():
        assert torch.allclose(value, agent_state(compiled)[name], rtol=0, atol=1e-5), name


# ---------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
TORCH_RAND = torch.rand  # the original, whatever a test patches


def fixed_noise(monkeypatch, seed=0):
    """Draw the update's noise (actions, dequantisation, VAE) on the CPU: both devices see it."""
    g = torch.Generator().manual_seed(seed)

    def randn_like(t):
        return torch.randn(t.shape, generator=g).to(t.device, t.dtype)

    def rand_like(t, dtype=None):
        return TORCH_RAND(t.shape, generator=g).to(t.device, dtype or t.dtype)

    monkeypatch.setattr(torch, "randn_like", randn_like)
    monkeypatch.setattr(torch, "rand_like", rand_like)


def test_fixed_noise_gives_two_updates_the_same_draws(monkeypatch):
    agents = [make_agent()[0] for _ in range(2)]
    batch = random_batch(agents[0], agents[0].args)
    for agent in agents:  # patched twice in one test, as the CUDA comparison does
        fixed_noise(monkeypatch)
        agent.update(batch, step=2)
    for name, value in agent_state(agents[0]).items():
        assert torch.equal(value, agent_state(agents[1])[name]), name


@cuda
def test_cuda_update_equals_cpu_update(monkeypatch):
    # float32 on both (pick_device turns TF32 off); cuDNN and oneDNN sum in other orders, so values
    # differ by ~1e-6 relative. Adam's first step is lr * g / |g|, which keeps that ~1e-6 unless a
    # gradient is within rounding of zero: 1e-4 absolute (a tenth of one lr-1e-3 step) separates
    # rounding from a wrong computation, which moves weights by a whole step.
    agents = {dev: make_agent(device=dev) for dev in ("cpu", "cuda")}
    batch = random_batch(*agents["cpu"])
    results = {}
    for dev, (agent, _) in agents.items():
        fixed_noise(monkeypatch)
        metrics = agent.update(tuple(t.to(dev) for t in batch), step=2)  # even: all four parts
        state = {k: v.cpu() for k, v in agent_state(agent).items()}
        results[dev] = ({k: v.cpu() for k, v in metrics.items()}, state)
    (m_cpu, p_cpu), (m_gpu, p_gpu) = results["cpu"], results["cuda"]
    for name in m_cpu:
        assert torch.allclose(m_cpu[name], m_gpu[name], rtol=1e-4, atol=1e-6), name
    for name in p_cpu:
        assert torch.allclose(p_cpu[name], p_gpu[name], rtol=0, atol=1e-4), name


@pytest.mark.parametrize("name,current", [("cuda", None), ("cuda:1", 1), ("cpu", None)])
def test_device_with_an_index_becomes_the_current_cuda_device(monkeypatch, name, current):
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d).index))
    flags = [(torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cuda.matmul, "allow_tf32")]  # fmt: skip
    saved = [getattr(module, flag) for module, flag in flags]
    try:
        for (module, flag), value in zip(flags, (False, True, True)):
            setattr(module, flag, value)
        assert sac_ae.pick_device(name) == torch.device(name)
        cuda = name != "cpu"  # cuDNN's autotuner for fixed shapes, and true float32 (TF32 off)
        assert [getattr(module, flag) for module, flag in flags] == [cuda, not cuda, not cuda]
    finally:  # the GPU numerics it chose, put back for the other tests
        for (module, flag), value in zip(flags, saved):
            setattr(module, flag, value)
    assert chosen == ([current] if current is not None else [])


def test_auto_device_is_cuda_when_there_is_one():
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert sac_ae.pick_device("auto") == expected


CUDA_RUN = with_flag(with_flag(TINY_RUN, "--total-steps", "400"), "--device", "cuda")


@cuda
def test_cuda_run_writes_its_run_folder(tmp_path):
    out = tmp_path / "run"
    assert sac_ae.main([*CUDA_RUN, "--out-dir", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["device_resolved"] == "cuda"
    assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0", "400"]
    assert float(read_csv(out / "train.csv")[-1]["critic_loss"]) > 0
    assert list((out / "checkpoints").glob("ckpt_*.pt"))
    model = torch.load(out / "model.pt", weights_only=True)  # as README loads it: on the CPU
    assert all(t.device.type == "cpu" for t in model["agent"].values())


@cuda
def test_checkpoint_moves_between_cuda_and_cpu(tmp_path):
    for first, then in (("cuda", "cpu"), ("cpu", "cuda")):
        out = tmp_path / f"{first}_to_{then}"
        assert sac_ae.main([*with_flag(CUDA_RUN, "--device", first), "--out-dir", str(out)]) == 0
        assert sac_ae.main(["--resume", str(out), "--device", then, "--total-steps", "600"]) == 0
        assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0", "400", "600"]
        assert json.loads((out / "config.json").read_text())["device_resolved"] == then


@cuda
@pytest.mark.parametrize("extra", [[], ["--compile"]])
def test_cuda_update_and_env_step_make_no_host_sync(extra, fresh_dynamo):
    # The ring lives on the GPU (replay_buffer puts it there): the batch is gathered there, the
    # update is queued, and the environment steps and stores its frame while the GPU works.
    agent, args = make_agent(*extra, device="cuda", action_dim=1)
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=args.image_size, action_repeat=8)
    buffer = sac_ae.replay_buffer(env, 20, 0, torch.device("cuda"))
    assert buffer.frames.is_cuda
    buffer.add_first(env.reset())
    for _ in range(20):
        obs, reward, discount, _, _ = env.step(np.zeros(env.action_dim))
        buffer.add(np.zeros(env.action_dim, np.float32), reward, discount, obs)
    for step in range(10 if args.compile else 1):  # one-off set-up (cuDNN plans, Adam state,
        agent.update(buffer.sample(4), step)  # compilation, CUDA-graph capture) may sync
    torch.cuda.synchronize()
    for step in (3, 4):  # odd and even: every part of the update
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_sync_debug_mode warns that it is a prototype
            torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
        try:
            batch = buffer.sample(4)
            assert all(t.is_cuda for t in batch)
            agent.update(batch, step)
            obs, reward, discount, _, _ = env.step(np.zeros(env.action_dim))
            buffer.add(np.zeros(env.action_dim, np.float32), reward, discount, obs)
        finally:
            torch.cuda.set_sync_debug_mode(0)


@cuda
def test_cuda_bf16_updates_stay_finite_and_keep_float32_parameters():
    agent, args = make_agent("--precision", "bf16", device="cuda")
    batch = tuple(t.cuda() for t in random_batch(agent, args))
    for step in range(6):
        before = agent.critic.Q1[0].weight.detach().clone()
        metrics = agent.update(batch, step)
        assert not torch.equal(before, agent.critic.Q1[0].weight), step
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in agent.parameters())


def pattern_noise(monkeypatch):
    """Deterministic "noise" made on the tensor's own device, which a CUDA graph can record."""

    def rand_like(t, dtype=None):
        n = torch.arange(t.numel(), device=t.device, dtype=torch.float32).reshape(t.shape)
        return (n * 0.6180339887 + 0.1).frac().to(dtype or t.dtype)  # spread over [0, 1)

    monkeypatch.setattr(torch, "rand_like", rand_like)
    monkeypatch.setattr(torch, "randn_like", lambda t: (rand_like(t) - 0.5) * 3)


def test_captured_step_protocol_with_cuda_faked(monkeypatch, capsys):
    """CapturedStep's bookkeeping, with torch.cuda's streams and graphs replaced by fakes that
    log what they are asked to do (the real capture is tested on a GPU, below)."""

    class Stream:
        def wait_stream(self, other):
            pass

    default, capture = Stream(), Stream()
    log, streams = [], {"current": default}

    class Graph:
        def replay(self):
            log.append("replay")

    @contextlib.contextmanager
    def graph(g, pool, stream, capture_error_mode):
        log.append("capture")
        streams["current"] = stream  # as torch.cuda.graph: the capture stream becomes current
        yield
        if fail:
            raise RuntimeError("capture invalidated")  # capture_end, before the stream is reset
        streams["current"] = default

    monkeypatch.setattr(torch.cuda, "Stream", lambda device: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device: streams["current"])
    monkeypatch.setattr(torch.cuda, "set_stream", lambda s: streams.update(current=s))
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    seen = []

    def fn(x, y):
        seen.append((x, y))
        log.append("run")
        return {"sum": x.sum() + y.sum()}

    base = torch.arange(12.0).reshape(3, 4)
    for fail in (False, True):
        log.clear(), seen.clear()
        graphs = {"pool": None, "stream": capture, "failed": False}
        steps = [sac_ae.CapturedStep(fn, torch.device("cpu"), f"v{i}", graphs) for i in (0, 1)]
        for call in range(6):
            out = steps[0](base.t() + call, base[:, :2] * call)  # strided views, as the batch
            if log[-1] == "run":  # (a replay's result is the graph's: the fake computes none)
                assert out["sum"] == (base.t() + call).sum() + (base[:, :2] * call).sum()
            else:
                assert out is steps[0].outputs
        assert all(x is seen[0][0] and x.is_contiguous() for x, _ in seen)  # fixed buffers
        assert streams["current"] is default
        if not fail:  # three warm-up runs, one capture (its run is the replay), then replays
            assert log == ["run"] * 3 + ["capture", "run", "replay", "replay", "replay"]
            assert steps[0].graph is not None
        else:  # the failed capture's call runs uncaptured, and no variant captures again
            assert log == ["run"] * 3 + ["capture", "run", "run", "run", "run"]
            assert "capture failed" in capsys.readouterr().out and graphs["failed"]
            for _ in range(5):
                steps[1](base, base)
            assert "capture" not in log[8:] and steps[1].graph is None


def test_compiled_variants_share_one_graph_pool_capture_stream_and_failure_flag(monkeypatch):
    agent, _ = make_agent(cls=Graphed)
    monkeypatch.setattr(torch, "compile", lambda fn: fn)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", object)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: object())
    for do_actor in (True, False):
        sac_ae.compiled_step(agent, dict(do_actor=do_actor, do_targets=True, do_ae=True))
    first, second = agent.compiled.values()
    assert isinstance(first, sac_ae.CapturedStep) and first.graphs is second.graphs
    assert set(first.graphs) == {"pool", "stream", "failed"} and not first.graphs["failed"]


class CompiledWithoutGraphs(sac_ae.SACAE):
    """--compile on CUDA, the same compiled kernels run one by one instead of replayed."""

    cuda_graphs = property(lambda self: False)


@cuda
def test_cuda_graph_replays_equal_the_compiled_update(monkeypatch, fresh_dynamo):
    # A replay must compute what the compiled kernels compute when launched one by one: both run
    # the same kernels, so on an H100 they agreed to the last printed digit at all 16 steps. A new
    # batch each step: a replay that read the captured batch, or left results in buffers the agent
    # does not use, would be off by whole losses.
    # Against eager, only the first steps are compared: inductor sums float32 in another order
    # (1e-7 to 2e-6 apart at step 0), and Adam's early steps (~lr * sign(grad)) amplify that ~10x
    # per two updates at batch 4, so a 16-step comparison with eager measures chaos.
    pattern_noise(monkeypatch)
    eager, args = make_agent(device="cuda")
    replayed, _ = make_agent("--compile", device="cuda")
    launched, _ = make_agent("--compile", device="cuda", cls=CompiledWithoutGraphs)
    # The same kernels for all three (pick_device, run by make_agent, turns the autotuner on).
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for step in range(16):  # each variant's 4th call is captured: steps 6 and 7
        if step == 8:
            before = {k: {n: v.clone() for n, v in agent_state(a).items()}
                      for k, a in (("r", replayed), ("l", launched))}  # fmt: skip
        batch = tuple(t.cuda() for t in random_batch(eager, args, seed=step))
        got, expected = replayed.update(batch, step), launched.update(batch, step)
        for name in expected:
            assert torch.allclose(expected[name], got[name], rtol=1e-5, atol=1e-6), (step, name)
        if step < 4:  # both variants, before Adam has amplified the summation order
            first = eager.update(batch, step)
            for name in first:
                assert torch.allclose(first[name], got[name], rtol=1e-3, atol=1e-4), (step, name)
    assert len(replayed.compiled) == 2  # odd and even steps, each replayed from its graph
    assert all(step.graph is not None for step in replayed.compiled.values())
    assert not any(hasattr(step, "graph") for step in launched.compiled.values())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in replayed.parameters())
    after = {"r": agent_state(replayed), "l": agent_state(launched)}
    moved = {k: {n for n, v in after[k].items() if not torch.equal(v, before[k][n])} for k in after}
    assert moved["r"] == moved["l"] and len(moved["l"]) > 20
    for name, value in after["l"].items():
        assert torch.allclose(value, after["r"][name], rtol=1e-5, atol=1e-6), name
    action = {agent: agent.act(batch[0][0].cpu().numpy(), True) for agent in (launched, replayed)}
    assert np.allclose(action[launched], action[replayed], rtol=1e-5, atol=1e-6)
