"""Specification of sac_ae.py as tests: one behaviour per test, real dm_control where cheap."""
import collections
import contextlib
import copy
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import sac_ae

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "sac_ae.py")


def small_args(*extra):
    """Resolved arguments with tiny networks, for tests of the maths."""
    return sac_ae.parse_args(["--image-size", "32", "--hidden-dim", "32", "--feature-dim", "8",
                              "--num-filters", "4", "--batch-size", "4", *extra])


def make_agent(*extra, action_dim=3, seed=0, device="cpu"):
    torch.manual_seed(seed)  # the same initial weights in every run of a test (made on the CPU)
    args = small_args(*extra)
    obs_shape = (3 * args.frame_stack, args.image_size, args.image_size) if args.obs == "pixels" else (5,)
    return sac_ae.SACAE(obs_shape, action_dim, sac_ae.pick_device(device), args), args


def random_batch(agent, args, batch=4, action_dim=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 3 * args.frame_stack, args.image_size, args.image_size)
    obs = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    next_obs = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    action = torch.rand(batch, action_dim, generator=g) * 2 - 1
    return obs, action, torch.rand(batch, 1, generator=g), next_obs, torch.ones(batch, 1)


def state_batch(batch, state_dim, action_dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, state_dim, generator=g), torch.rand(batch, action_dim, generator=g) * 2 - 1,
            torch.rand(batch, 1, generator=g), torch.randn(batch, state_dim, generator=g), torch.ones(batch, 1))


def conv_params(agent):
    return [p.detach().clone() for p in agent.critic.encoder.trunk.parameters()]


def same(before, module_params):
    return all(torch.equal(a, b.detach()) for a, b in zip(before, module_params))


# ---------------------------------------------------------------------------- environment
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
        assert np.array_equal(obs[3 * j:3 * j + 3], first)
    nxt, *_ = env.step(np.ones(env.action_dim))
    assert np.array_equal(nxt[:6], obs[3:])  # shifted by one frame
    assert np.array_equal(nxt[6:], env.env.physics.render(84, 84, camera_id=0).transpose(2, 0, 1))
    assert not np.array_equal(nxt[6:], first)


def test_action_repeat_sums_rewards_and_advances_physics_r_times():
    wrapped = sac_ae.DMCEnv("cheetah", "run", seed=5, obs="state", action_repeat=4)
    raw = sac_ae.load_suite().load("cheetah", "run", task_kwargs={"random": 5})
    wrapped.reset(), raw.reset()
    rng = np.random.default_rng(0)
    for _ in range(3):
        action = rng.uniform(-1, 1, wrapped.action_dim)
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


def test_action_repeat_defaults_per_domain():
    expected = {"cartpole": 8, "reacher": 4, "cheetah": 4, "finger": 2, "ball_in_cup": 4, "walker": 2,
                "hopper": 2}
    tasks = {"cartpole": "swingup", "reacher": "easy", "cheetah": "run", "finger": "spin",
             "ball_in_cup": "catch", "walker": "walk", "hopper": "hop"}
    for domain, repeat in expected.items():
        assert sac_ae.parse_args(["--domain", domain, "--task", tasks[domain]]).action_repeat == repeat
    assert sac_ae.parse_args(["--action-repeat", "3"]).action_repeat == 3


def test_quadruped_renders_from_camera_2():
    env = sac_ae.DMCEnv("quadruped", "walk", seed=0, action_repeat=2)
    assert env.camera_id == 2
    obs = env.reset()
    expected = env.env.physics.render(84, 84, camera_id=2).transpose(2, 0, 1)
    assert np.array_equal(obs[-3:], expected)
    assert not np.array_equal(obs[-3:], env.env.physics.render(84, 84, camera_id=0).transpose(2, 0, 1))


# ---------------------------------------------------------------------------- replay buffer
def scripted_episodes(lengths, frame_stack, channels=1, size=2):
    """Frames numbered by time, stacked exactly as DMCEnv does; yields buffer calls and naive transitions."""
    counter = 0
    for length in lengths:
        counter += 1
        stack = collections.deque([np.full((channels, size, size), counter % 256, np.uint8)] * frame_stack,
                                  maxlen=frame_stack)
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
    k, capacity = 3, 20
    buffer = sac_ae.ReplayBuffer((1, 2, 2), np.uint8, k, 1, capacity, episode_length=5, seed=0,
                                 device=torch.device("cpu"))
    naive = []
    lengths = [1, 5, 2, 7, 3, 1, 6, 4, 5, 2, 9, 1]  # > capacity in total: the ring wraps twice
    for kind, item in scripted_episodes(lengths, k):
        if kind == "first":
            buffer.add_first(item)
        else:
            buffer.add(item[1], item[2], item[4], item[3])
            naive.append(item)
    assert buffer.t > 2 * buffer.size
    by_id = {int(a[0]): (o, a, r, n, d) for o, a, r, n, d in naive}
    valid = [t for t in range(buffer.t - buffer.size, buffer.t) if buffer._valid(np.array([t]))[0]]
    obs, action, reward, next_obs, not_done = buffer.get(np.array(valid))
    ids = action[:, 0].int().tolist()
    assert set(ids) >= {int(a[0]) for _, a, _, _, _ in naive[-capacity:]}  # the newest `capacity` at least
    for j, i in enumerate(ids):
        o, a, r, n, d = by_id[i]
        assert np.array_equal(obs[j].numpy(), o), f"obs of transition {i}"
        assert np.array_equal(next_obs[j].numpy(), n), f"next_obs of transition {i}"
        assert reward[j, 0].item() == pytest.approx(r) and not_done[j, 0].item() == d
    sampled = buffer.sample(256)[1][:, 0].int().tolist()
    assert set(sampled) <= set(ids) and len(set(sampled)) > len(ids) // 2


def test_replay_buffer_rebuilds_real_environment_stacks():
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=1, obs="state", frame_stack=3, action_repeat=8)
    buffer = sac_ae.ReplayBuffer(env.frame_shape, np.float32, 3, env.action_dim, 200, env.episode_length,
                                 device=torch.device("cpu"))
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
    buffer = sac_ae.ReplayBuffer((3, 84, 84), np.uint8, 3, 6, 100_000, episode_length=250,
                                 device=torch.device("cpu"))
    assert buffer.bytes_per_transition < 21_500
    assert buffer.nbytes >= 100_000 * 3 * 84 * 84  # every transition keeps at least its frame


# ---------------------------------------------------------------------------- networks
@pytest.mark.parametrize("size", [84, 64, 65])
def test_network_shapes(size):
    args = sac_ae.parse_args(["--image-size", str(size), "--hidden-dim", "16"])
    agent = sac_ae.SACAE((9, size, size), 6, torch.device("cpu"), args)
    obs = torch.randint(0, 256, (2, 9, size, size), dtype=torch.uint8)
    z = agent.critic.encoder(obs)
    assert z.shape == (2, 50) and z.abs().max() <= 1
    assert agent.decoder(z).shape == (2, 9, size, size)
    q1, q2 = agent.critic(obs, torch.zeros(2, 6))
    assert q1.shape == q2.shape == (2, 1)
    mu, log_std = agent.actor(obs)
    assert mu.shape == log_std.shape == (2, 6)
    assert log_std.min() >= -10 and log_std.max() <= 2
    if size == 84:
        assert agent.critic.encoder.trunk.out_dim == 32 * 35 * 35


def test_actor_and_critic_share_one_conv_trunk_but_not_the_head():
    agent, _ = make_agent()
    assert agent.actor.encoder.trunk is agent.critic.encoder.trunk
    assert agent.actor.encoder.head is not agent.critic.encoder.head
    assert agent.critic_target.encoder.trunk is not agent.critic.encoder.trunk


# ---------------------------------------------------------------------------- gradient routing
def test_critic_step_moves_conv_weights():
    agent, args = make_agent()
    before = conv_params(agent)
    agent.update_critic(*random_batch(agent, args))
    assert not same(before, agent.critic.encoder.trunk.parameters())


def test_actor_loss_leaves_conv_weights_unchanged():
    agent, args = make_agent()
    obs = random_batch(agent, args)[0]
    before, head_before = conv_params(agent), [p.detach().clone() for p in agent.actor.encoder.head.parameters()]
    critic_before = [p.detach().clone() for p in agent.critic.parameters()]
    h = agent.critic.encoder.trunk(obs)
    agent.update_actor_and_alpha(h.detach(), agent.critic.encoder.head(h).detach())
    assert same(before, agent.critic.encoder.trunk.parameters())
    assert same(critic_before, agent.critic.parameters())
    assert not same(head_before, agent.actor.encoder.head.parameters())


def test_actor_forward_sends_no_gradient_into_the_shared_convs():
    agent, args = make_agent()
    mu, log_std = agent.actor(random_batch(agent, args)[0])
    (mu.sum() + log_std.sum()).backward()
    assert all(p.grad is None for p in agent.critic.encoder.trunk.parameters())
    assert agent.actor.encoder.head[0].weight.grad is not None


def test_full_update_on_an_odd_step_does_not_touch_the_actor():
    agent, args = make_agent()
    actor_before = [p.detach().clone() for p in agent.actor.policy.parameters()]
    agent.update(random_batch(agent, args), step=1)
    assert same(actor_before, agent.actor.policy.parameters())
    agent.update(random_batch(agent, args), step=2)
    assert not same(actor_before, agent.actor.policy.parameters())


def test_decoder_step_moves_conv_and_decoder_weights():
    agent, args = make_agent()
    obs = random_batch(agent, args)[0]
    before, dec_before = conv_params(agent), [p.detach().clone() for p in agent.decoder.parameters()]
    h = agent.critic.encoder.trunk(obs)
    agent.update_autoencoder(obs, h, agent.critic.encoder.head(h))
    assert not same(before, agent.critic.encoder.trunk.parameters())
    assert not same(dec_before, agent.decoder.parameters())


def test_soft_target_update_moves_encoder_by_0_05_and_q_heads_by_0_01():
    agent, _ = make_agent()
    with torch.no_grad():
        for p in agent.critic.parameters():
            p.add_(torch.randn_like(p))
    old = copy.deepcopy(agent.critic_target)
    agent.update_targets()
    for name, tau in (("encoder", 0.05), ("Q1", 0.01), ("Q2", 0.01)):
        for new, prev, online in zip(getattr(agent.critic_target, name).parameters(), getattr(old, name).parameters(),
                                     getattr(agent.critic, name).parameters()):
            assert torch.allclose(new, prev + tau * (online - prev), atol=1e-6), name


# ---------------------------------------------------------------------------- losses
def test_reconstruction_target_is_5_bit_grid_plus_dequantisation_noise():
    obs = torch.arange(256, dtype=torch.uint8).repeat(40).view(10, 4, 16, 16)
    target = sac_ae.reconstruction_target(obs, bits=5)
    assert target.min() >= -0.5 and target.max() <= 0.5
    grid = torch.floor(obs.float() / 8) / 32 - 0.5  # the 5-bit bin each pixel falls in
    noise = target - grid
    assert noise.min() >= 0 and noise.max() < 1 / 32 + 1e-7
    assert noise.std() > 0.25 / 32  # uniform over the bin, not a constant offset


@pytest.mark.parametrize("log_std,direction", [(-10.0, +1), (0.0, -1)])
def test_temperature_rises_when_entropy_is_below_target_and_falls_above(log_std, direction):
    agent, args = make_agent()
    last = agent.actor.policy[-1]
    with torch.no_grad():  # pin the policy's std: log_std output = tanh^-1 of the wanted point
        last.weight.zero_()
        u = (log_std - args.actor_log_std_min) / (args.actor_log_std_max - args.actor_log_std_min) * 2 - 1
        last.bias[3:] = torch.atanh(torch.tensor(max(min(u, 0.999), -0.999)))
    obs = random_batch(agent, args)[0]
    h = agent.critic.encoder.trunk(obs)
    before = agent.log_alpha.item()
    metrics = agent.update_actor_and_alpha(h.detach(), agent.critic.encoder.head(h).detach())
    below = metrics["entropy"].item() < agent.target_entropy
    assert below == (direction > 0)
    assert (agent.log_alpha.item() - before) * direction > 0


# ---------------------------------------------------------------------------- command line
def run_cli(*argv, timeout=600):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, SCRIPT, *argv], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=HERE)


def run_cli_parallel(*argvs, timeout=900):
    """Several runs side by side, one CPU thread each (the suite has to fit CI's budget)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, SCRIPT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=HERE) for argv in argvs]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


SHORT_RUN = ["--domain", "cheetah", "--task", "run", "--seed", "3", "--total-steps", "600", "--init-steps", "30",
             "--eval-freq", "300", "--eval-episodes", "1", "--batch-size", "8", "--image-size", "48",
             "--hidden-dim", "64", "--device", "cpu"]


def test_short_pixel_run_writes_run_folder_and_is_reproducible(tmp_path):
    outs = [tmp_path / "run0", tmp_path / "run1"]
    for result in run_cli_parallel(*[[*SHORT_RUN, "--out-dir", str(out)] for out in outs]):
        assert result.returncode == 0, result.stderr[-2000:]
    config = json.loads((outs[0] / "config.json").read_text())
    assert config["action_repeat"] == 4 and config["decoder"] == "pixel" and config["versions"]["mujoco"]
    evals = read_csv(outs[0] / "eval.csv")
    assert [int(r["env_step"]) for r in evals] == [0, 300, 600]
    assert [int(r["agent_step"]) for r in evals] == [0, 75, 150]
    train = read_csv(outs[0] / "train.csv")
    assert int(train[-1]["env_step"]) == 600
    # A burst of 30 updates at agent step 30, then one per agent step 31..149.
    assert int(train[-1]["updates"]) == 30 + 119
    assert float(train[-1]["critic_loss"]) > 0 and float(train[-1]["ae_loss"]) > 0
    assert sorted(os.listdir(outs[0] / "recon")) == ["eval_0.png", "eval_300.png", "eval_600.png"]
    import imageio.v2 as imageio
    assert imageio.imread(outs[0] / "recon" / "eval_300.png").shape == (2 * 48, 3 * 48, 3)
    assert {"probe_r2", "probe_r2_position", "probe_r2_velocity"} <= set(evals[0])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = EventAccumulator(str(outs[0] / "tb")).Reload()
    assert {"charts/episodic_return", "losses/qf_loss", "losses/ae_loss", "eval/return", "eval/probe_r2"} <= set(tb.Tags()["scalars"])
    assert [e.step for e in tb.Scalars("eval/return")] == [0, 300, 600] and tb.Tags()["images"] == ["eval/reconstruction"]
    again = read_csv(outs[1] / "eval.csv")
    assert [r["episode_return_mean"] for r in evals] == [r["episode_return_mean"] for r in again]
    assert [r["critic_loss"] for r in train] == [r["critic_loss"] for r in read_csv(outs[1] / "train.csv")]


def test_baselines_run_from_the_command_line(tmp_path):
    modes = {"state": ["--obs", "state"], "pixel": ["--decoder", "none"]}
    results = run_cli_parallel(*[[*SHORT_RUN, *mode, "--out-dir", str(tmp_path / name)] for name, mode in modes.items()])
    for name, result in zip(modes, results):
        assert result.returncode == 0, result.stderr[-2000:]
        train = read_csv(tmp_path / name / "train.csv")
        assert float(train[-1]["critic_loss"]) > 0 and train[-1]["ae_loss"] == ""
        assert len(read_csv(tmp_path / name / "eval.csv")) == 3
    assert json.loads((tmp_path / "state" / "config.json").read_text())["frame_stack"] == 1
    assert np.isfinite(run_readme_snippet(tmp_path / "state")["action"]).all()


@pytest.mark.parametrize("argv,needle", [
    (["--domain", "chetah"], "valid domains: acrobot"),
    (["--task", "walk"], "valid tasks: run"),
    (["--batch-size", "0"], "--batch-size"),
    (["--total-steps", "-5"], "--total-steps"),
    (["--buffer-size", "0"], "--buffer-size"),
    (["--image-size", "12"], "too small"),
    (["--obs", "rgb"], "--obs"),
    (["--decoder", "vae2"], "--decoder"),
    (["--device", "tpu"], "--device"),
    (["--obs", "state", "--decoder", "pixel"], "--decoder pixel needs --obs pixels"),
    (["--critic-tau", "1.5"], "--critic-tau"),
    (["--seed", "-1"], "--seed"),
    (["--ae-bits", "9"], "--ae-bits"),
    (["--freeze-encoder"], "--freeze-encoder needs --load-encoder"),
    (["--resume", "runs/x", "--benchmark"], "--benchmark cannot be combined with --resume"),
    (["--decoder", "none", "--ae-grad", "separate"], "--ae-grad separate needs a decoder"),
    (["--no-such-flag"], "unrecognized"),
    (["--actor-log-std-min", "nan"], "--actor-log-std-min"),
    (["--init-temperature", "inf"], "--init-temperature"),
    (["--critic-lr", "nan"], "--critic-lr"),
    (["--device", "cuda:x"], "--device"),
    (["--plot", os.path.join(HERE, "README.md")], "not an eval.csv"),
    (["--plot", os.path.join(HERE, "no-such.csv")], "cannot read it"),
] + ([(["--device", "cuda"], "CUDA is not available")] if not torch.cuda.is_available() else []))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, needle):
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as exit_info:  # in-process: the same code path as the command line
        sac_ae.main([*argv, "--out-dir", str(out)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert len(lines) == 1 and needle in lines[0]
    assert not out.exists()


def test_bad_input_from_the_shell_has_no_traceback(tmp_path):
    result = run_cli("--domain", "chetah", "--out-dir", str(tmp_path / "never"), timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "never").exists()


def test_existing_non_empty_out_dir_is_refused_and_left_alone(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    result = run_cli("--out-dir", str(tmp_path), timeout=120)
    assert result.returncode == 2 and "not empty" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


# ---------------------------------------------------------------------------- the update, literally
def literal_update(agent, batch, step):
    """SPEC 4 transcribed step by step, every part recomputing its own forward passes.

    The reference the optimised `SACAE.update` must equal. Same random draws in the same order:
    the critic's next-action noise, the actor's noise (even steps), the dequantisation noise.
    """
    a = agent.args
    obs, action, reward, next_obs, not_done = batch

    def squashed_sample(mu, log_std):
        eps = torch.randn_like(mu)
        u = mu + eps * torch.exp(log_std)
        log_p = torch.sum(-0.5 * eps ** 2 - log_std, dim=-1, keepdim=True) - 0.5 * np.log(2 * np.pi) * mu.shape[-1]
        act = torch.tanh(u)
        return act, log_p - torch.sum(torch.log(torch.clamp(1 - act ** 2, min=0) + 1e-6), dim=-1, keepdim=True)

    def features(trunk, o):  # SPEC 3: x/255 through the convs, flattened (state: the vector itself)
        # One float copy per pass, as the trunk's own scaling made before: the timing stays comparable.
        return o if isinstance(trunk, torch.nn.Identity) else trunk.convs(o.float().div_(255)).flatten(1)

    def policy(o):  # the actor's encoder on detached conv features, then its MLP
        feat = agent.actor.encoder.head(features(agent.actor.encoder.trunk, o).detach())
        mu, raw = agent.actor.policy(feat).chunk(2, dim=-1)
        lo, hi = a.actor_log_std_min, a.actor_log_std_max
        return mu, lo + (hi - lo) * (torch.tanh(raw) + 1) / 2

    def q_values(critic, o, act, detach=False):
        h = features(critic.encoder.trunk, o)
        z = critic.encoder.head(h.detach() if detach else h)
        return critic.Q1(torch.cat([z, act], 1)), critic.Q2(torch.cat([z, act], 1))

    alpha = agent.log_alpha.exp().detach()
    # 1. critic
    with torch.no_grad():
        next_act, next_log_p = squashed_sample(*policy(next_obs))
        tq1, tq2 = q_values(agent.critic_target, next_obs, next_act)
        y = reward + a.gamma * not_done * (torch.min(tq1, tq2) - alpha * next_log_p)
    q1, q2 = q_values(agent.critic, obs, action)
    critic_loss = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    agent.critic_opt.zero_grad()
    critic_loss.backward()
    agent.critic_opt.step()
    if step % a.actor_update_freq == 0:
        # 2. actor, then temperature
        pi, log_p = squashed_sample(*policy(obs))
        aq1, aq2 = q_values(agent.critic, obs, pi, detach=True)
        actor_loss = torch.mean(agent.log_alpha.exp().detach() * log_p - torch.min(aq1, aq2))
        agent.actor_opt.zero_grad()
        actor_loss.backward()
        agent.actor_opt.step()
        alpha_loss = torch.mean(agent.log_alpha.exp() * (-log_p - agent.target_entropy).detach())
        agent.log_alpha_opt.zero_grad()
        alpha_loss.backward()
        agent.log_alpha_opt.step()
    if step % a.target_update_freq == 0:
        # 3. targets: Q heads slowly, the encoder faster
        with torch.no_grad():
            for name, tau in (("Q1", a.critic_tau), ("Q2", a.critic_tau), ("encoder", a.encoder_tau)):
                for p, tp in zip(getattr(agent.critic, name).parameters(), getattr(agent.critic_target, name).parameters()):
                    tp.copy_(tau * p + (1 - tau) * tp)
    if agent.decoder is not None and step % a.ae_update_freq == 0:
        # 4. autoencoder
        z = agent.critic.encoder.head(features(agent.critic.encoder.trunk, obs))
        target = torch.floor(obs.float() / 8) / 32 + torch.rand(obs.shape) / 32 - 0.5
        loss = ((agent.decoder(z) - target) ** 2).mean() + a.decoder_latent_lambda * (0.5 * (z ** 2).sum(1)).mean()
        agent.encoder_opt.zero_grad()
        agent.decoder_opt.zero_grad()
        loss.backward()
        agent.encoder_opt.step()
        agent.decoder_opt.step()


def agent_state(agent):
    named = {}
    for prefix, module in agent.modules().items():
        named.update({f"{prefix}.{n}": p.detach() for n, p in module.named_parameters()})
    named["log_alpha"] = agent.log_alpha.detach()
    return named


@pytest.mark.parametrize("extra", [[], ["--decoder", "none"], ["--obs", "state"]])
def test_optimised_update_equals_literal_transcription(extra):
    agent, args = make_agent(*extra)
    with torch.no_grad():  # open a gap between online and target weights, so target rates show
        for p in agent.critic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    reference, initial = copy.deepcopy(agent), agent_state(copy.deepcopy(agent))
    for step in (2, 3, 4):  # even, odd, even: the actor and targets move on even steps only
        if args.obs == "pixels":
            batch = random_batch(agent, args, seed=step)
        else:
            g = torch.Generator().manual_seed(step)
            batch = (torch.randn(4, 5, generator=g), torch.rand(4, 3, generator=g) * 2 - 1,
                     torch.rand(4, 1, generator=g), torch.randn(4, 5, generator=g), torch.ones(4, 1))
        torch.manual_seed(100 + step)
        agent.update(batch, step)
        torch.manual_seed(100 + step)
        literal_update(reference, batch, step)
    ours, theirs = agent_state(agent), agent_state(reference)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.allclose(ours[name], theirs[name], atol=1e-5, rtol=0), name
    moved = [name for name in ours if not torch.equal(ours[name], initial[name])]
    assert "log_alpha" in moved and "critic_target.Q1.0.weight" in moved and "actor.policy.0.weight" in moved


def plain_copy(agent):
    """A copy of the agent laid out as the authors' code runs: NCHW tensors throughout."""
    plain = copy.deepcopy(agent)
    for module in plain.modules().values():
        for sub in module.modules():
            if hasattr(sub, "memory_format"):
                sub.memory_format = torch.contiguous_format
        for p in module.parameters():
            p.data = p.data.contiguous()
    for name, opt in vars(plain).items():  # default (for-loop) Adam, as the authors' code
        if isinstance(opt, torch.optim.Adam):
            g = opt.param_groups[0]
            setattr(plain, name, torch.optim.Adam(g["params"], lr=g["lr"], betas=g["betas"],
                                                  weight_decay=g["weight_decay"]))
    return plain


def test_plain_layout_computes_the_same_update():
    agent, args = make_agent()
    plain = plain_copy(agent)
    assert plain.critic.encoder.trunk.convs[0].weight.is_contiguous()
    batch = random_batch(agent, args)
    for step in (2, 3):
        torch.manual_seed(step)
        agent.update(batch, step)
        torch.manual_seed(step)
        literal_update(plain, batch, step)
    for name, value in agent_state(agent).items():
        assert torch.allclose(value, agent_state(plain)[name], atol=1e-5, rtol=0), name


def compare_speed(argv):
    """`python test_sac_ae.py [training flags]`: ms/update of the literal transcription on an NCHW
    copy (what the authors' code computes, the way it computes it) against SACAE.update, measured
    alternately in this one process on the same batch."""
    import time
    args = sac_ae.parse_args(argv)
    action_dim, b, size = 6, args.batch_size, args.image_size
    agent = sac_ae.SACAE((3 * args.frame_stack, size, size), action_dim, torch.device("cpu"), args)
    plain = plain_copy(agent)
    g = torch.Generator().manual_seed(0)
    obs = torch.randint(0, 256, (b, 3 * args.frame_stack, size, size), generator=g, dtype=torch.uint8)
    batch = (obs, torch.rand(b, action_dim, generator=g) * 2 - 1, torch.rand(b, 1, generator=g),
             torch.roll(obs, 1, 0), torch.ones(b, 1))
    times = {"literal": [], "ours": []}
    pairs = 8
    for step in range(2 + 2 * pairs):  # two warm-up updates each, then even/odd pairs
        for name, fn in (("literal", lambda s: literal_update(plain, batch, s)), ("ours", lambda s: agent.update(batch, s))):
            start = time.perf_counter()
            fn(step)
            times[name].append(time.perf_counter() - start)
    literal, ours = (1000 * np.array(times[k][2:]).reshape(pairs, 2).mean(1) for k in ("literal", "ours"))
    # Shared machines drift by tens of percent within a minute: pair each of ours with the literal
    # pair timed right beside it, and show the spread as well as the ratio of the means.
    ratios = ours / literal
    print(f"literal transcription: {literal.mean():.0f} ms/update | SACAE.update: {ours.mean():.0f} ms/update | "
          f"ratio {ours.mean() / literal.mean():.2f} (pairs: median {np.median(ratios):.2f}, range "
          f"{ratios.min():.2f}-{ratios.max():.2f}) | batch {b}, {size}x{size}, threads {torch.get_num_threads()}")


if __name__ == "__main__":
    compare_speed(sys.argv[1:])


# ---------------------------------------------------------------------------- memory
@pytest.mark.parametrize("extra", [[], ["--decoder", "vae"], ["--decoder", "none"], ["--obs", "state"]])
def test_update_metrics_own_only_their_own_bytes(extra):
    agent, args = make_agent(*extra)
    batch = random_batch(agent, args) if args.obs == "pixels" else state_batch(4, 5, 3)
    for step in (1, 2):  # odd: critic and autoencoder; even: actor, temperature and targets too
        for name, value in agent.update(batch, step).items():
            assert value.untyped_storage().nbytes() <= 8, (name, value.untyped_storage().nbytes())


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_resident_memory_stays_flat_while_the_loop_keeps_metrics():
    # At batch 16 and 32x32 a leak of the reconstruction buffer would grow 590 KB per update.
    agent, args = make_agent("--batch-size", "16")
    batch = random_batch(agent, args, batch=16)
    kept = []  # as the training loop keeps them until the episode's end
    for step in range(200):
        kept.append((step, agent.update(batch, step)))
        if step == 19:
            after_20 = resident_bytes()
    assert resident_bytes() - after_20 < 8 * 2**20, (resident_bytes() - after_20) / 2**20


# ---------------------------------------------------------------------------- speed options
def test_bf16_update_runs_and_keeps_parameters_float32():
    agent, args = make_agent("--precision", "bf16")
    before = conv_params(agent)
    metrics = agent.update(random_batch(agent, args), step=2)
    assert all(torch.isfinite(v) for v in metrics.values())
    assert not same(before, agent.critic.encoder.trunk.parameters())
    for module in agent.modules().values():
        assert all(p.dtype == torch.float32 for p in module.parameters())
    assert agent.log_alpha.dtype == torch.float32
    assert all(s["exp_avg"].dtype == torch.float32 for s in agent.critic_opt.state.values())


def test_benchmark_prints_the_final_line():
    result = run_cli("--benchmark", "--bench-updates", "2", "--batch-size", "4", "--image-size", "32",
                     "--hidden-dim", "16", "--domain", "cartpole", "--task", "swingup", "--device", "cpu")
    assert result.returncode == 0, result.stderr[-2000:]
    last = result.stdout.strip().splitlines()[-1]
    fields = dict(kv.split("=", 1) for kv in last.split()[1:])
    assert last.startswith("benchmark ") and list(fields) == [
        "ms_per_update", "updates_per_s", "env_steps_per_s", "replay_bytes_per_transition", "device", "precision"]
    assert float(fields["ms_per_update"]) > 0 and float(fields["env_steps_per_s"]) > 0
    assert int(fields["replay_bytes_per_transition"]) > 3 * 32 * 32
    assert (fields["device"], fields["precision"]) == ("cpu", "fp32")


# ---------------------------------------------------------------------------- checkpoints and resume
import hashlib
import shutil
import signal
import time

TINY_RUN = ["--domain", "cartpole", "--task", "swingup", "--seed", "2", "--total-steps", "1000", "--init-steps", "30",
            "--eval-freq", "400", "--eval-episodes", "1", "--checkpoint-freq", "200", "--batch-size", "8",
            "--image-size", "32", "--hidden-dim", "32", "--num-filters", "8", "--device", "cpu"]


def logged_rows(run_dir):
    """eval.csv and train.csv without their wall-clock columns."""
    out = {}
    for name in ("eval.csv", "train.csv"):
        out[name] = [{k: v for k, v in r.items() if k not in ("wall_time", "fps")} for r in read_csv(run_dir / name)]
    return out


def final_weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_run(a, b):
    assert logged_rows(a) == logged_rows(b)
    wa, wb = final_weights(a), final_weights(b)
    for module in ("critic", "critic_target", "actor", "decoder"):
        for name, value in wa[module].items():
            assert torch.equal(value, wb[module][name]), f"{module}.{name}"
    assert torch.equal(wa["log_alpha"], wb["log_alpha"])


def folder_digest(path):
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run_cli(*TINY_RUN, "--out-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def start_and_kill_at(tmp_path, marker, sig, delay=0.0):
    """Start TINY_RUN; `delay` seconds after stdout shows `marker` (after the first checkpoint), send `sig`."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, *TINY_RUN, "--out-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=HERE)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if marker in line and list((out / "checkpoints").glob("ckpt_*.pt")):
            time.sleep(delay)
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    proc.wait(timeout=300)
    return out, proc.returncode, "".join(seen) + rest


@pytest.mark.parametrize("delay", [0.0, 2.0])  # at the evaluation boundary at 400; mid-episode after it
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, reference_run, delay):
    out, code, _ = start_and_kill_at(tmp_path, "[eval] env_step 400", signal.SIGKILL, delay)
    assert code == -signal.SIGKILL and not (out / "model.pt").exists()
    result = run_cli("--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "[resume]" in result.stdout
    assert_same_run(out, reference_run)


def test_sigint_writes_a_checkpoint_and_the_run_resumes(tmp_path, reference_run):
    out, code, stdout = start_and_kill_at(tmp_path, "[eval] env_step 400", signal.SIGINT, delay=1.0)
    assert code == 130 and "resume with" in stdout
    result = run_cli("--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, reference_run)


def test_resume_extends_a_finished_run_and_ignores_a_half_written_checkpoint(tmp_path, reference_run):
    out = tmp_path / "run"
    short = [a if a != "1000" else "400" for a in TINY_RUN]
    assert run_cli(*short, "--out-dir", str(out)).returncode == 0
    # A crash between writing and renaming the next checkpoint leaves a .tmp and maybe a replay chunk.
    (out / "checkpoints" / "ckpt_0000000600_000000000077.pt.tmp").write_bytes(b"partial")
    config = json.loads((out / "config.json").read_text())
    assert config["buffer_size"] == 50  # resolved from the first --total-steps, kept on resume
    result = run_cli("--resume", str(out), "--total-steps", "1000")
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0", "400", "800", "1000"]
    assert json.loads((out / "config.json").read_text())["total_steps"] == 1000  # a later --resume sees it


def test_truncated_checkpoint_is_refused_and_the_folder_left_as_it_was(tmp_path, reference_run):
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    latest = sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1]
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    before = folder_digest(out)
    result = run_cli("--resume", str(out), "--total-steps", "2000")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "unreadable" in lines[0], result.stderr
    assert folder_digest(out) == before


@pytest.mark.parametrize("setup,argv,needle", [
    ("missing", [], "no such folder"),
    ("empty", [], "config.json"),
    ("no_ckpt", [], "no checkpoint"),
    ("ok", ["--batch-size", "16"], "--batch-size cannot be given with --resume"),
    ("foreign", [], "incompatible configuration"),
])
def test_bad_resume_is_one_line_exit_2_and_changes_nothing(tmp_path, reference_run, setup, argv, needle):
    out = tmp_path / "run"
    if setup != "missing":
        out.mkdir()
    if setup in ("no_ckpt", "ok", "foreign"):
        shutil.copy(reference_run / "config.json", out / "config.json")
    if setup in ("ok", "foreign"):
        shutil.copytree(reference_run / "checkpoints", out / "checkpoints")
        for name in ("eval.csv", "train.csv"):
            shutil.copy(reference_run / name, out / name)
    if setup == "foreign":
        config = json.loads((out / "config.json").read_text())
        config["critic_lr"] = 0.5
        (out / "config.json").write_text(json.dumps(config))
    before = folder_digest(out) if out.exists() else None
    result = run_cli("--resume", str(out), *argv)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr
    assert (folder_digest(out) if out.exists() else None) == before


def test_nan_loss_stops_the_run_naming_loss_and_step_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    original = sac_ae.SACAE.update

    def poisoned(self, batch, step):
        metrics = original(self, batch, step)
        if step == 60:
            metrics["critic_loss"] = metrics["critic_loss"] * float("nan")
        return metrics

    monkeypatch.setattr(sac_ae.SACAE, "update", poisoned)
    args = sac_ae.parse_args([*TINY_RUN, "--out-dir", str(tmp_path / "run")])
    with pytest.raises(sac_ae.NonFiniteError, match=r"critic_loss became nan at agent step 60 "):
        sac_ae.train(args)
    found = sac_ae.checkpoints(str(tmp_path / "run"))
    assert [step for step, _, _ in found] == [200, 400]  # agent step 60 is env step 480: no checkpoint at 600
    payload = torch.load(found[-1][2], weights_only=False)
    assert all(torch.isfinite(v).all() for v in payload["agent"]["critic"].values())
    assert not (tmp_path / "run" / "model.pt").exists()


def run_readme_snippet(run_dir):
    """Execute README.md's model.pt snippet, as printed there, on run_dir; return its namespace."""
    with open(os.path.join(HERE, "README.md")) as f:
        blocks = f.read().split("```python\n")[1:]
    snippet = [b.split("```")[0] for b in blocks if "RUN_DIR/model.pt" in b]
    assert len(snippet) == 1, "README.md should hold one python block loading RUN_DIR/model.pt"
    namespace = {}
    exec(snippet[0].replace("RUN_DIR", str(run_dir)), namespace)
    return namespace


def test_readme_model_snippet_acts_with_the_exported_weights(reference_run):
    ns = run_readme_snippet(reference_run)
    w, agent, action = ns["w"], ns["agent"], ns["action"]
    assert action.shape == (1,) and np.isfinite(action).all()
    assert torch.equal(agent.actor.policy[0].weight, w["actor"]["policy.0.weight"])


# ---------------------------------------------------------------------------- the paper's variants
def real_batch(args, n=40, batch=4):
    """A batch sampled from a replay buffer filled with real cartpole pixels and random actions."""
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=args.image_size, action_repeat=8)
    buffer = sac_ae.ReplayBuffer(env.frame_shape, np.uint8, 3, env.action_dim, n, env.episode_length,
                                 device=torch.device("cpu"))
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


def test_vae_reconstructs_a_sampled_latent_while_rl_heads_read_the_mean():
    agent, args = make_agent("--decoder", "vae", "--vae-beta", "0.5", action_dim=1)
    batch = real_batch(args)
    obs = batch[0]
    assert torch.equal(agent.critic.encoder(obs), agent.critic.encoder(obs))  # the mean: deterministic
    log_var_before = agent.critic.encoder.log_var.weight.detach().clone()
    torch.manual_seed(0)
    metrics = agent.update(batch, step=2)
    assert metrics["kl"].item() > 0 and not torch.equal(log_var_before, agent.critic.encoder.log_var.weight)
    recon, kl = metrics["recon_loss"].item(), metrics["kl"].item()
    assert metrics["ae_loss"].item() == pytest.approx(recon + 0.5 * kl, rel=1e-5)


def test_separate_ae_grad_critic_leaves_encoder_and_decoder_moves_it():
    agent, args = make_agent("--ae-grad", "separate", action_dim=1)
    obs, action, reward, next_obs, not_done = real_batch(args)
    before = conv_params(agent)
    head = [p.detach().clone() for p in agent.critic.encoder.head.parameters()]
    q_before = agent.critic.Q1[0].weight.detach().clone()
    agent.update_critic(obs, action, reward, next_obs, not_done)
    assert same(before, agent.critic.encoder.trunk.parameters()) and same(head, agent.critic.encoder.head.parameters())
    assert not torch.equal(q_before, agent.critic.Q1[0].weight)
    h = agent.critic.encoder.trunk(obs)
    agent.update_autoencoder(obs, h, agent.critic.encoder.head(h))
    assert not same(before, agent.critic.encoder.trunk.parameters())


def exported_agent(tmp_path, *extra):
    agent, args = make_agent(*extra, action_dim=1)
    agent.update(real_batch(args), step=2)  # weights that are no longer the initial ones
    args.out_dir = str(tmp_path)
    sac_ae.export_model(str(tmp_path), args, agent)
    return agent


def test_load_encoder_copies_conv_and_heads_exactly(tmp_path):
    source = exported_agent(tmp_path)
    agent, _ = make_agent("--load-encoder", str(tmp_path), action_dim=1)
    agent.load_encoder(str(tmp_path))  # as train() does for a new run (a resumed one has its checkpoint)
    for mine, theirs in ((agent.critic.encoder, source.critic.encoder), (agent.critic_target.encoder, source.critic.encoder),
                         (agent.actor.encoder.head, source.actor.encoder.head)):
        for (name, a), (_, b) in zip(mine.state_dict().items(), theirs.state_dict().items()):
            assert torch.equal(a, b), name
    assert not torch.equal(agent.critic.Q1[0].weight, source.critic.Q1[0].weight)  # only the encoder moves over


def test_freeze_encoder_keeps_loaded_weights_fixed_through_training(tmp_path):
    exported_agent(tmp_path)
    agent, args = make_agent("--load-encoder", str(tmp_path), "--freeze-encoder", action_dim=1)
    agent.load_encoder(str(tmp_path))
    frozen = {n: p.detach().clone() for n, p in agent.critic.encoder.named_parameters()}
    actor_head = [p.detach().clone() for p in agent.actor.encoder.head.parameters()]
    q_before = agent.critic.Q1[0].weight.detach().clone()
    batch = real_batch(args)
    for step in range(4):
        agent.update(batch, step)
    assert all(torch.equal(p, frozen[n]) for n, p in agent.critic.encoder.named_parameters())
    assert same(actor_head, agent.actor.encoder.head.parameters())
    assert not torch.equal(q_before, agent.critic.Q1[0].weight)


def test_linear_probe_r2_is_near_1_for_a_linear_state_and_near_0_for_noise():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2000, 10))
    mixing = rng.standard_normal((10, 5))
    linear = latents @ mixing + 0.01 * rng.standard_normal((2000, 5))
    groups = [("position", 2), ("velocity", 3)]
    good = sac_ae.linear_probe(latents, linear, groups)
    assert good["probe_r2"] > 0.99 and good["probe_r2_position"] > 0.99 and good["probe_r2_velocity"] > 0.99
    noise = sac_ae.linear_probe(latents, rng.standard_normal((2000, 5)), groups)
    assert abs(noise["probe_r2"]) < 0.05
    few = sac_ae.linear_probe(latents[:60], linear[:60], groups)  # 30 frames for 11 coefficients
    assert np.isnan(few["probe_r2"]) and np.isnan(few["probe_r2_velocity"])


def test_reconstruction_image_puts_the_stacked_frames_above_their_reconstructions():
    obs = np.random.default_rng(0).integers(0, 256, (9, 16, 20), dtype=np.uint8)
    picture = sac_ae.reconstruction_image(obs, obs.astype(np.float32) / 255 - 0.5)
    assert picture.shape == (32, 60, 3) and picture.dtype == np.uint8
    assert np.array_equal(picture[:16, 20:40], obs[3:6].transpose(1, 2, 0))
    assert np.abs(picture[16:].astype(int) - picture[:16].astype(int)).max() <= 1


def test_paper_variants_run_from_the_command_line(tmp_path, reference_run):
    variants = {"vae_iter": ["--decoder", "vae", "--ae-grad", "separate", "--ae-update-freq", "2"],
                "transfer": ["--domain", "cartpole", "--task", "balance", "--decoder", "none",
                             "--load-encoder", str(reference_run), "--freeze-encoder"]}
    results = run_cli_parallel(*[[*TINY_RUN, *argv, "--total-steps", "400", "--out-dir", str(tmp_path / name)]
                                 for name, argv in variants.items()])
    for name, result in zip(variants, results):
        assert result.returncode == 0, result.stderr[-2000:]
        assert len(read_csv(tmp_path / name / "eval.csv")) == 2
        assert np.isfinite(run_readme_snippet(tmp_path / name)["action"]).all()


# ---------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


TORCH_RAND = torch.rand  # the original, whatever a test patches


def fixed_noise(monkeypatch, seed=0):
    """Draw the update's noise (actions, dequantisation, VAE) on the CPU, so both devices see the same."""
    g = torch.Generator().manual_seed(seed)
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.randn(t.shape, generator=g).to(t.device, t.dtype))
    monkeypatch.setattr(torch, "rand", lambda size, device=None: TORCH_RAND(size, generator=g).to(device))


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
        metrics = agent.update(tuple(t.to(dev) for t in batch), step=2)  # even: all four steps
        results[dev] = ({k: v.cpu() for k, v in metrics.items()}, {k: v.cpu() for k, v in agent_state(agent).items()})
    (m_cpu, p_cpu), (m_gpu, p_gpu) = results["cpu"], results["cuda"]
    for name in m_cpu:
        assert torch.allclose(m_cpu[name], m_gpu[name], rtol=1e-4, atol=1e-6), name
    for name in p_cpu:
        assert torch.allclose(p_cpu[name], p_gpu[name], rtol=0, atol=1e-4), name


@cuda
def test_cuda_update_makes_no_host_sync():
    import warnings
    agent, args = make_agent(device="cuda", action_dim=1)
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=args.image_size, action_repeat=8)
    buffer = sac_ae.ReplayBuffer(env.frame_shape, np.uint8, 3, env.action_dim, 20, env.episode_length,
                                 device=torch.device("cuda"))
    buffer.add_first(env.reset())
    for _ in range(20):
        obs, reward, discount, _, _ = env.step(np.zeros(env.action_dim))
        buffer.add(np.zeros(env.action_dim, np.float32), reward, discount, obs)
    agent.update(buffer.sample(4), step=2)  # one-off set-up (cuDNN plans, Adam state) may sync
    torch.cuda.synchronize()
    for step in (3, 4):  # odd and even: every part of the update
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # set_sync_debug_mode warns that it is a prototype
            torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
        try:
            batch = buffer.sample(4)
            assert all(t.is_cuda for t in batch)
            agent.update(batch, step)
        finally:
            torch.cuda.set_sync_debug_mode(0)


CUDA_RUN = [*TINY_RUN[:TINY_RUN.index("--device")], "--total-steps", "400"]


@cuda
def test_cuda_run_writes_its_run_folder(tmp_path):
    out = tmp_path / "run"
    result = run_cli(*CUDA_RUN, "--device", "cuda", "--out-dir", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "config.json").read_text())["device_resolved"] == "cuda"
    assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0", "400"]
    assert float(read_csv(out / "train.csv")[-1]["critic_loss"]) > 0
    assert (out / "model.pt").exists() and list((out / "checkpoints").glob("ckpt_*.pt"))


@cuda
def test_checkpoint_moves_between_cuda_and_cpu(tmp_path):
    moves = {"cuda_to_cpu": ("cuda", "cpu"), "cpu_to_cuda": ("cpu", "cuda")}
    results = run_cli_parallel(*[[*CUDA_RUN, "--device", first, "--out-dir", str(tmp_path / name)]
                                 for name, (first, _) in moves.items()])
    assert all(r.returncode == 0 for r in results), [r.stderr[-1000:] for r in results]
    for name, (_, then) in moves.items():
        result = run_cli("--resume", str(tmp_path / name), "--device", then, "--total-steps", "600")
        assert result.returncode == 0, result.stderr[-2000:]
        assert [r["env_step"] for r in read_csv(tmp_path / name / "eval.csv")] == ["0", "400", "600"]
        assert json.loads((tmp_path / name / "config.json").read_text())["device_resolved"] == then


@cuda
@pytest.mark.parametrize("extra", [["--precision", "bf16"], ["--compile"]])
def test_cuda_fast_modes_stay_finite_and_keep_float32_parameters(extra):
    agent, args = make_agent(*extra, device="cuda")
    batch = tuple(t.cuda() for t in random_batch(agent, args))
    before = agent_state(agent)["critic.Q1.0.weight"].clone()
    for step in range(6):
        metrics = agent.update(batch, step)
    assert all(torch.isfinite(v).all() for v in metrics.values()), metrics
    for module in agent.modules().values():
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.parameters())
    assert not torch.equal(before, agent_state(agent)["critic.Q1.0.weight"])
    if args.compile:  # odd and even steps: two compiled variants
        assert len(agent.compiled) == 2


# ---------------------------------------------------------------------------- faults
def one_line_error(capsys):
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_nan_action_stops_before_the_simulator_naming_the_loss_and_step(tmp_path, capsys):
    # alpha = exp(log 1e300) is inf in float32: the first update's Bellman target is not finite.
    out = tmp_path / "run"
    assert sac_ae.main([*TINY_RUN, "--init-temperature", "1e300", "--out-dir", str(out)]) == 1
    line = one_line_error(capsys)
    assert "critic_loss became" in line and "at agent step 30" in line and "PhysicsError" not in line
    assert [step for step, _, _ in sac_ae.checkpoints(str(out))] == [200]  # the last good one, kept
    assert str(sac_ae.checkpoints(str(out))[-1][2]) in line


def test_nan_action_in_evaluation_is_refused_too(monkeypatch):
    agent, args = make_agent(action_dim=1)
    with torch.no_grad():
        agent.actor.policy[-1].bias.fill_(float("nan"))
    env = sac_ae.DMCEnv("cartpole", "swingup", seed=0, image_size=args.image_size, action_repeat=8)
    with pytest.raises(sac_ae.NonFiniteError, match="action became"):
        sac_ae.evaluate(env, agent, episodes=1)


def test_checkpoint_with_a_flipped_byte_is_refused_and_changes_nothing(tmp_path, reference_run):
    import zipfile
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    latest = sorted((out / "checkpoints").glob("ckpt_*.pt"))[-1]
    with zipfile.ZipFile(latest) as z:  # a byte in the middle of the largest tensor's data
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(latest.read_bytes())
    name_len, extra_len = int.from_bytes(data[member.header_offset + 26:member.header_offset + 28], "little"), \
        int.from_bytes(data[member.header_offset + 28:member.header_offset + 30], "little")
    data[member.header_offset + 30 + name_len + extra_len + member.file_size // 2] ^= 0x01
    latest.write_bytes(bytes(data))
    before = folder_digest(out)
    result = run_cli("--resume", str(out), "--total-steps", "2000")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and "CRC" in lines[0], result.stderr
    assert folder_digest(out) == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_second_signal_while_a_checkpoint_is_written_exits_cleanly(tmp_path, monkeypatch, capsys, sig):
    save = sac_ae.save_checkpoint

    def signalled_twice(*a, **k):  # both signals arrive while the checkpoint is being written
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), sig)
        return save(*a, **k)

    monkeypatch.setattr(sac_ae, "save_checkpoint", signalled_twice)
    out = tmp_path / "run"
    assert sac_ae.main([*TINY_RUN, "--out-dir", str(out)]) == 128 + sig
    line = one_line_error(capsys)
    assert f"a second {signal.Signals(sig).name}" in line and f"--resume {out}" in line
    found = sac_ae.checkpoints(str(out))
    assert [step for step, _, _ in found] == [200] and not list((out / "checkpoints").glob("*.tmp"))
    torch.load(found[0][2], weights_only=False)  # complete and loadable


def test_interrupted_before_any_checkpoint_does_not_offer_resume(tmp_path, monkeypatch, capsys):
    def interrupted_twice(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        return 0.01

    monkeypatch.setattr(sac_ae, "time_one_update", interrupted_twice)
    assert sac_ae.main([*TINY_RUN, "--out-dir", str(tmp_path / "run")]) == 130
    line = one_line_error(capsys)
    assert "no checkpoint exists yet" in line and "--resume" not in line


def test_out_dir_that_cannot_be_made_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out, needle in ((tmp_path / "file" / "run", "is a file"), ("", "--out-dir is empty"),
                        (tmp_path / "file", "is a file")):
        with pytest.raises(SystemExit) as exit_info:
            sac_ae.main(["--domain", "cartpole", "--task", "swingup", "--out-dir", str(out)])
        assert exit_info.value.code == 2 and needle in one_line_error(capsys)


@pytest.fixture
def tmpfs(tmp_path):
    """A small filesystem of its own (needs root, as CI runs); skipped where mounting is refused."""
    mounted = []

    def mount(options):
        point = tmp_path / f"fs{len(mounted)}"
        point.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_read_only_out_dir_is_refused_before_work(tmpfs, capsys):
    read_only = tmpfs("ro,size=1m")
    with pytest.raises(SystemExit) as exit_info:
        sac_ae.main(["--domain", "cartpole", "--task", "swingup", "--out-dir", str(read_only / "run")])
    assert exit_info.value.code == 2 and "read-only" in one_line_error(capsys)


def test_disk_full_ends_in_one_line_keeps_the_checkpoint_and_the_run_resumes(tmpfs, reference_run):
    disk = tmpfs("size=64m")
    out = disk / "run"
    proc = subprocess.Popen([sys.executable, SCRIPT, *TINY_RUN, "--out-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"), cwd=HERE)
    for line in proc.stdout:
        if "[eval] env_step 400" in line:  # after the checkpoint at 200: fill the disk
            with open(disk / "filler", "wb") as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 2**20)
                        f.flush()
            break
    out_rest, err = proc.communicate(timeout=300)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert "No space left on device" in lines[0] and "is intact" in lines[0] and f"--resume {out}" in lines[0]
    assert not list(out.rglob("*.tmp"))
    (disk / "filler").unlink()
    result = run_cli("--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert_same_run(out, reference_run)


def test_image_size_beyond_the_offscreen_buffer_is_one_line(tmp_path, capsys):
    assert sac_ae.main(["--domain", "cartpole", "--task", "swingup", "--image-size", "1000",
                        "--out-dir", str(tmp_path / "run")]) == 2
    assert "offscreen buffer (640x480); use at most 480" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_networks_too_large_for_memory_are_one_line(tmp_path, capsys):
    assert sac_ae.main([*TINY_RUN, "--hidden-dim", "2000000", "--out-dir", str(tmp_path / "run")]) == 1
    assert "out of memory" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_plot_refuses_an_empty_eval_csv(tmp_path, capsys):
    empty = tmp_path / "eval.csv"
    empty.write_text("env_step,agent_step,episode_return_mean,episode_return_std\n")
    with pytest.raises(SystemExit) as exit_info:
        sac_ae.main(["--plot", str(empty)])
    assert exit_info.value.code == 2 and "no evaluation rows" in one_line_error(capsys)


BURST_RUN = [*TINY_RUN[:TINY_RUN.index("--total-steps")], "--total-steps", "400", "--init-updates", "1500",
             *TINY_RUN[TINY_RUN.index("--total-steps") + 2:]]


def test_sigint_in_the_burst_stops_within_an_update_and_resumes_identically(tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    uninterrupted = subprocess.Popen([sys.executable, SCRIPT, *BURST_RUN, "--out-dir", str(reference)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=HERE,
                                     env=dict(os.environ))  # thread counts alike: oneDNN sums by thread
    proc = subprocess.Popen([sys.executable, SCRIPT, *BURST_RUN, "--out-dir", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, cwd=HERE,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    for line in proc.stdout:
        if line.startswith("[burst]"):
            time.sleep(1.0)  # some updates in: the burst is about 10 s long here
            proc.send_signal(signal.SIGINT)
            break
    proc.communicate(timeout=300)
    assert proc.returncode == 130
    payload = torch.load(sac_ae.checkpoints(str(out))[-1][2], weights_only=False)
    assert 0 < payload["loop"]["updates_due"] < 1500 and payload["loop"]["pending_action"] is not None
    result = run_cli("--resume", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "of its burst still to run" in result.stdout
    assert uninterrupted.wait(timeout=300) == 0, uninterrupted.stderr.read()[-2000:]
    assert_same_run(out, reference)


def test_updates_left_counts_the_burst_then_one_per_agent_step():
    def by_hand(agent_step, total, init_steps, init_updates):  # the training loop's rule, step by step
        return sum(init_updates if s == init_steps else 1 for s in range(agent_step, total) if s >= init_steps)

    for total, init_steps, init_updates in ((1250, 1000, 1000), (500, 1000, 1000), (40, 10, 3), (40, 10, 1)):
        for agent_step in range(0, total + 1, 5):
            assert sac_ae.updates_left(agent_step, total, init_steps, init_updates) == \
                by_hand(agent_step, total, init_steps, init_updates), (agent_step, total, init_steps)
    # The cartpole run of 10k env steps (1,250 agent steps) at env step 8,000: the burst is ahead.
    assert sac_ae.updates_left(1000, 1250, 1000, 1000) == 1249


# ---------------------------------------------------------------------------- --compile
def test_compiled_update_equals_eager_update():
    # Inductor draws its own random numbers unless told to call PyTorch's (fallback_random); with
    # the same draws the compiled kernels differ from eager only in float32 summation order:
    # 1e-5 is a hundredth of one Adam step of lr 1e-3, far below what a wrong computation moves.
    import torch._inductor.config
    eager, args = make_agent()
    compiled, _ = make_agent("--compile")
    for step in (2, 3):  # even (all four parts) and odd (critic and autoencoder)
        batch = random_batch(eager, args, seed=step)
        torch.manual_seed(step)
        expected = eager.update(batch, step)
        torch.manual_seed(step)
        with torch._inductor.config.patch(fallback_random=True):
            got = compiled.update(batch, step)
        for name in expected:
            assert torch.allclose(expected[name], got[name], rtol=1e-5, atol=1e-6), name
    assert len(compiled.compiled) == 2
    for name, value in agent_state(eager).items():
        assert torch.allclose(value, agent_state(compiled)[name], rtol=0, atol=1e-5), name


def test_compiled_run_prints_compile_time_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    short = [*TINY_RUN[:TINY_RUN.index("--total-steps")], "--total-steps", "400",
             *TINY_RUN[TINY_RUN.index("--total-steps") + 2:], "--compile"]
    assert sac_ae.main([*short, "--out-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("[compile] update with critic, actor, targets, ae: compiled in") == 1
    assert sac_ae.main(["--resume", str(out), "--total-steps", "600"]) == 0
    assert [r["env_step"] for r in read_csv(out / "eval.csv")] == ["0", "400", "600"]
