"""SAC+AE: soft actor-critic from pixels, made stable by a regularized autoencoder.

Yarats et al., "Improving Sample Efficiency in Model-Free Reinforcement Learning from Images"
(arXiv 1910.01741): a conv encoder shared by the critic and a deterministic decoder, shaped by
their gradients and never by the actor's (Sec. 5). In the order a run happens: networks, agent
and update, environment, replay buffer, evaluation, training loop; then, below the banner, the
run-keeping.

    python sac_ae.py --domain cheetah --task run --seed 3
"""

import argparse
import collections
import contextlib
import copy
import csv
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import pickle
import random
import re
import resource
import signal
import sys
import threading
import time
import warnings
import zipfile
import zlib

import imageio
import imageio.v3 as iio
import numpy as np
import torch
import torch._functorch.config
import torch.nn as nn
import torch.nn.functional as F
import tqdm

# Headless rendering by default; dm_control reads this once, when it is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")


# ================================================================================ networks (Fig. 4)
def conv_output_size(image_size, num_layers):
    """Side of the last conv map: 3x3 kernels, no padding, stride 2 then 1 (84->41->39->37->35)."""
    return (image_size - 3) // 2 + 1 - 2 * (num_layers - 1)


def weight_init(m):
    """Orthogonal Linear weights; conv kernels zero but an orthogonal centre tap (authors' code)."""
    if isinstance(m, nn.Linear):
        nn.init.orthogonal_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.zeros_(m.weight)
        nn.init.zeros_(m.bias)
        mid = m.weight.size(2) // 2
        nn.init.orthogonal_(m.weight.data[:, :, mid, mid], nn.init.calculate_gain("relu"))


class MLP(nn.Sequential):  # float32 even under bf16, which would round a Q in the hundreds by 2-4
    def __init__(self, n_in, n_hidden, n_out):
        super().__init__(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_hidden))
        self.extend([nn.ReLU(), nn.Linear(n_hidden, n_out)])

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def latent_head(in_dim, feature_dim):
    """Linear -> LayerNorm -> tanh: conv features to a bounded latent z (authors' code)."""
    return nn.Sequential(nn.Linear(in_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


class Encoder(nn.Module):
    """The convs that the critic, the actor and the decoder's gradient share: (B, 9, 84, 84) in
    [0, 1] -> (B, 32 * 35 * 35) features. States (SAC:state): the identity."""

    def __init__(self, obs_shape, num_filters=32, num_layers=4, pixels=True):
        super().__init__()
        if not pixels:
            self.convs, self.repr_dim = nn.Identity(), obs_shape[0]
            return
        layers = [nn.Conv2d(obs_shape[0], num_filters, 3, stride=2), nn.ReLU(inplace=True)]
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(num_filters, num_filters, 3, stride=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.repr_dim = num_filters * conv_output_size(obs_shape[-1], num_layers) ** 2

    def forward(self, obs):
        return self.convs(obs).flatten(1)


class Actor(nn.Module):
    """Its own latent head on the conv features, then a tanh-squashed Gaussian policy."""

    def __init__(self, repr_dim, feature_dim, action_dim, hidden_dim, log_std_bounds, pixels=True):
        super().__init__()
        self.head = latent_head(repr_dim, feature_dim) if pixels else nn.Identity()
        self.policy = MLP(feature_dim if pixels else repr_dim, hidden_dim, 2 * action_dim)
        self.log_std_min, self.log_std_max = log_std_bounds

    def forward(self, h):  # (B, 39200) conv features -> mean, log_std, each (B, A)
        mu, log_std = self.policy(self.head(h)).chunk(2, dim=-1)  # float32, as the MLPs run
        # tanh, then affine onto [log_std_min, log_std_max]: a soft clamp (authors' code).
        lo, hi = self.log_std_min, self.log_std_max
        return mu, lo + 0.5 * (hi - lo) * (log_std.tanh() + 1)


def sample_action(mu, log_std):
    """Reparameterised tanh-Gaussian sample and its log-probability (Haarnoja et al., App. C)."""
    noise = torch.randn_like(mu)
    u = mu + noise * log_std.exp()
    log_prob = (-0.5 * noise.pow(2) - log_std).sum(-1, keepdim=True)
    log_prob = log_prob - 0.5 * math.log(2 * math.pi) * mu.size(-1)
    action = torch.tanh(u)
    # Change of variables through tanh; relu and 1e-6 guard the log (authors' code).
    log_prob = log_prob - torch.log(F.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
    return action, log_prob


class Critic(nn.Module):
    """Its latent head z = head(h), the decoder's input too, then two Q networks on concat(z, a)
    (clipped double Q). With --decoder vae, log_var is the posterior's, around z (Eq. 4)."""

    def __init__(self, repr_dim, feature_dim, action_dim, hidden_dim, pixels=True, vae=False):
        super().__init__()
        self.head = latent_head(repr_dim, feature_dim) if pixels else nn.Identity()
        z_dim = feature_dim if pixels else repr_dim
        self.Q1 = MLP(z_dim + action_dim, hidden_dim, 1)
        self.Q2 = MLP(z_dim + action_dim, hidden_dim, 1)
        self.log_var = nn.Linear(repr_dim, feature_dim) if vae else None

    def forward(self, h, action, detach_z=False):  # (B, 39200), (B, A) -> (B, 1), (B, 1)
        z = self.head(h)
        za = torch.cat([z.detach() if detach_z else z, action], dim=-1)
        return self.Q1(za), self.Q2(za)


class Decoder(nn.Module):
    """z -> reconstructed observation: the encoder mirrored with transposed convs (Fig. 4)."""

    def __init__(self, out_channels, image_size, feature_dim=50, num_filters=32, num_layers=4):
        super().__init__()
        self.side, self.num_filters = conv_output_size(image_size, num_layers), num_filters
        self.fc = nn.Linear(feature_dim, num_filters * self.side**2)
        layers = []
        for _ in range(num_layers - 1):
            layers += [nn.ConvTranspose2d(num_filters, num_filters, 3), nn.ReLU(inplace=True)]
        # The stride-2 layer gives back 2s+1 pixels; output_padding adds the one an even size lost.
        padding = (image_size - 3) % 2
        last = nn.ConvTranspose2d(num_filters, out_channels, 3, stride=2, output_padding=padding)
        self.deconvs = nn.Sequential(*layers, last)

    def forward(self, z):  # (B, 50) -> (B, 9, 84, 84), no output activation
        h = F.relu(self.fc(z)).view(-1, self.num_filters, self.side, self.side)
        return self.deconvs(h)


def kl_to_standard_normal(mu, log_var):
    """KL(N(mu, exp(log_var)) || N(0, I)), summed over latent dims, averaged over the batch."""
    return (0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(dim=1)).mean()


def soft_update(net, target, tau):
    """Polyak averaging: target <- tau * net + (1 - tau) * target, parameter by parameter."""
    for p, target_p in zip(net.parameters(), target.parameters()):
        target_p.lerp_(p, tau)


# =============================================================================== the agent (Sec. 5)
class SACAE(nn.Module):
    """SAC whose critic's encoder is also trained to reconstruct its input: encoder (the shared
    convs), actor and critic (each with its latent head), decoder, their targets encoder_target and
    critic_target, and the temperature alpha = exp(log_alpha)."""

    def __init__(self, obs_shape, action_dim, device, args):
        super().__init__()
        self.args, self.device = args, device
        pixels, dims = args.obs == "pixels", (args.feature_dim, action_dim, args.hidden_dim)
        self.encoder = Encoder(obs_shape, args.num_filters, args.num_conv_layers, pixels)
        log_std_bounds = (args.actor_log_std_min, args.actor_log_std_max)
        self.actor = Actor(self.encoder.repr_dim, *dims, log_std_bounds, pixels)
        self.critic = Critic(self.encoder.repr_dim, *dims, pixels, vae=args.decoder == "vae")
        conv = (args.feature_dim, args.num_filters, args.num_conv_layers)
        self.decoder = (
            Decoder(obs_shape[0], args.image_size, *conv) if args.decoder != "none" else None
        )
        for net in (self.encoder, self.actor, self.critic, self.decoder):
            if net is not None:
                net.apply(weight_init)
        if args.freeze_encoder:  # transfer (Fig. 7): the loaded convs and heads stay as they are
            for part in (self.encoder, self.critic.head, self.actor.head, self.critic.log_var):
                if part is not None:
                    part.requires_grad_(False)
        # The targets: a copy of the encoder (the target encoder) and of the critic.
        self.encoder_target = copy.deepcopy(self.encoder)
        self.critic_target = copy.deepcopy(self.critic)
        self.log_alpha = nn.Parameter(torch.tensor(math.log(args.init_temperature)))
        self.target_entropy = -float(action_dim)  # -|A| (SAC's heuristic)
        self.to(device, memory_format=torch.channels_last)  # conv kernels NHWC, as their inputs

        def adam(params, lr, beta1=0.9, weight_decay=0.0):  # fused: one kernel per step
            params = [p for p in params if p.requires_grad]
            if not params:  # --freeze-encoder leaves the encoder's optimizer nothing to move
                return None
            kw = dict(fused=True, capturable=self.cuda_graphs)  # a CUDA graph needs capturable
            return torch.optim.Adam(params, lr, (beta1, 0.999), weight_decay=weight_decay, **kw)

        # The critic's optimizer moves the encoder too; the actor's never does (Sec. 5).
        critic_params = [*self.encoder.parameters(), *self.critic.parameters()]
        self.critic_opt = adam(critic_params, args.critic_lr, args.critic_beta)
        self.actor_params = [p for p in self.actor.parameters() if p.requires_grad]
        self.actor_opt = adam(self.actor_params, args.actor_lr, args.actor_beta)
        self.log_alpha_opt = adam([self.log_alpha], args.alpha_lr, args.alpha_beta)
        self.encoder_opt = self.decoder_opt = None
        if self.decoder is not None:
            # The AE step has its own Adam on the encoder and the critic's head, beside the
            # critic's (authors' code), and an L2 penalty on the decoder (RAE).
            encoder_params = [*self.encoder.parameters(), *self.critic.head.parameters()]
            if self.critic.log_var is not None:
                encoder_params += self.critic.log_var.parameters()
            self.encoder_opt = adam(encoder_params, args.encoder_lr)
            decay = args.decoder_weight_decay
            self.decoder_opt = adam(self.decoder.parameters(), args.decoder_lr, weight_decay=decay)
        self.compiled = {}  # --compile: update_step compiled per combination of parts

    # ------------------------------------------------------------------------ the update
    def update(self, batch, step):
        """One update (Sec. 5, authors' code); `step` is the agent step, which picks the parts."""
        a = self.args
        parts = dict(do_actor=step % a.actor_update_freq == 0)
        parts.update(do_targets=step % a.target_update_freq == 0)
        parts["do_ae"] = self.decoder is not None and step % a.ae_update_freq == 0
        if self.args.compile:
            update_step = compiled_step(self, parts)  # below the banner: same maths, faster
        else:
            update_step = functools.partial(self.update_step, **parts)
        with self.autocast():  # --precision bf16: bf16 save the MLPs, losses and Adam (float32)
            metrics = update_step(*batch)
        # .clone(): a 0-d loss may view its whole element-wise buffer (F.mse_loss on CPU).
        return {k: v.detach().clone() for k, v in metrics.items()}

    def update_step(self, obs, action, reward, next_obs, not_done, do_actor, do_targets, do_ae):
        pixels = obs  # (B, 9, 84, 84) uint8: the reconstruction target is made from these
        obs, next_obs = self.prepare(obs), self.prepare(next_obs)
        critic_metrics = self.update_critic(obs, action, reward, next_obs, not_done)
        actor_metrics, ae_metrics = {}, {}
        if do_actor or do_ae:
            # Conv features after the critic step, read by the actor (detached, so its loss
            # never moves the convs: Sec. 5) and by the autoencoder (not detached).
            h = self.encoder(obs)
        if do_actor:
            actor_metrics = self.update_actor_and_alpha(h.detach())
        if do_targets:
            self.update_targets()
        if do_ae:
            ae_metrics = self.update_autoencoder(pixels, h)
        return {**critic_metrics, **actor_metrics, **ae_metrics}

    def update_critic(self, obs, action, reward, next_obs, not_done):
        """J(Q), Eq. 1, on clipped double Q: the soft Bellman residual, which trains the encoder."""
        with torch.no_grad():
            next_action, next_log_pi = sample_action(*self.actor(self.encoder(next_obs)))
            target_q1, target_q2 = self.critic_target(self.encoder_target(next_obs), next_action)
            target_v = torch.min(target_q1, target_q2) - self.alpha * next_log_pi
            # not_done is the discount: 0 only at a true terminal, not at DMC's time limit.
            target_q = reward + not_done * self.args.gamma * target_v
        # --ae-grad separate (Sec. 4.3): the critic reads a detached z; only the AE moves the convs.
        q1, q2 = self.critic(self.encoder(obs), action, detach_z=self.args.ae_grad == "separate")
        loss = F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)  # float32, as Q1, Q2 run
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        return {"critic_loss": loss, "q": q1.mean()}

    def update_actor_and_alpha(self, h):
        """J(pi), Eq. 2, on detached conv features; then alpha's (SAC v2, arXiv 1812.05905)."""
        pi, log_pi = sample_action(*self.actor(h))
        q1, q2 = self.critic(h, pi)
        actor_loss = (self.alpha.detach() * log_pi - torch.min(q1, q2)).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=self.actor_params)  # no gradients computed for the critic
        self.actor_opt.step()
        # Raise alpha while the policy's entropy is below the target, lower it above.
        alpha_loss = (self.alpha * (-log_pi - self.target_entropy).detach()).mean()
        self.log_alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.log_alpha_opt.step()
        metrics = {"actor_loss": actor_loss, "alpha_loss": alpha_loss, "alpha": self.alpha}
        return {**metrics, "entropy": -log_pi.mean()}

    @torch.no_grad()
    def update_targets(self):
        """The target encoder (convs and the critic's head) follows faster than the target Q
        networks (Sec. 5): tau 0.05 against 0.01 (authors' code)."""
        soft_update(self.encoder, self.encoder_target, self.args.encoder_tau)
        soft_update(self.critic.head, self.critic_target.head, self.args.encoder_tau)
        soft_update(self.critic.Q1, self.critic_target.Q1, self.args.critic_tau)
        soft_update(self.critic.Q2, self.critic_target.Q2, self.args.critic_tau)

    def update_autoencoder(self, pixels, h):
        """J(AE), Eq. 3, as an RAE (Ghosh et al., 2019; Sec. 5): reconstruct the 5-bit observation
        from the critic's z, plus an L2 penalty on z and the decoder's weight decay (in its Adam;
        both authors' code). --decoder vae: J(VAE), Eq. 4, on a sample of the posterior."""
        # 8-bit pixels -> ae_bits-bit bins scaled to [-0.5, 0.5), plus uniform dequantisation
        # noise of one bin (Kingma & Dhariwal, Glow):
        #     target = floor(pixels / 2^(8 - bits)) / 2^bits - 0.5 + U(0, 1) / 2^bits
        # written with an integer shift, in place (faster than the formula, the same values).
        noise = torch.rand_like(pixels, dtype=torch.float32)
        target = noise.add_(pixels >> (8 - self.args.ae_bits)).div_(2**self.args.ae_bits).sub_(0.5)
        z = self.critic.head(h)
        metrics = {}
        if self.args.decoder == "vae":
            z, log_var = z.float(), self.critic.log_var(h).float()
            sample = z + torch.randn_like(z) * (0.5 * log_var).exp()  # reparameterised
            recon_loss = F.mse_loss(self.decoder(sample).float(), target)
            metrics["kl"] = kl = kl_to_standard_normal(z, log_var)
            loss = recon_loss + self.args.vae_beta * kl
        else:
            recon_loss = F.mse_loss(self.decoder(z).float(), target)
            latent_loss = (0.5 * z.float().pow(2).sum(dim=1)).mean()
            loss = recon_loss + self.args.decoder_latent_lambda * latent_loss
        optimizers = [opt for opt in (self.encoder_opt, self.decoder_opt) if opt is not None]
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        return {"ae_loss": loss, "recon_loss": recon_loss, **metrics}

    # ------------------------------------------------------------------------ acting
    @property
    def alpha(self):
        return self.log_alpha.exp()

    def prepare(self, obs):
        """uint8 pixels -> float32 in [0, 1] (the authors' x / 255), channels-last: oneDNN and
        cuDNN convolve NHWC fastest, the maths is the same. States pass as they are."""
        if obs.dtype != torch.uint8:
            return obs
        return obs.contiguous(memory_format=torch.channels_last).float().div_(255.0)

    @torch.no_grad()
    def infer(self, obs, part):
        """One observation through the encoder, then `part` of the networks, under autocast."""
        obs = self.prepare(torch.as_tensor(obs, device=self.device).unsqueeze(0))
        with self.autocast():
            return part(self.encoder(obs))

    def act(self, obs, deterministic=False):
        """One action in [-1, 1]^A: sampled while training, tanh(mean) for evaluation."""
        mu, log_std = self.infer(obs, self.actor)
        with torch.no_grad():
            action = torch.tanh(mu) if deterministic else sample_action(mu, log_std)[0]
        action = action[0].cpu().numpy()
        if not np.isfinite(action).all():  # never hand the simulator a NaN: it would fail there
            raise NonFiniteError(f"the policy's action became {action.tolist()}")
        return action

    def latent(self, obs):
        """The critic's z of one observation (the posterior mean with --decoder vae)."""
        return self.infer(obs, self.critic.head)[0].float().cpu().numpy()

    def autocast(self):  # no cache of bf16 weights: the optimizers step them inside the update
        bf16 = self.args.precision == "bf16"
        return torch.autocast(self.device.type, torch.bfloat16, enabled=bf16, cache_enabled=False)

    # ------------------------------------------------------------------------ bookkeeping
    @property
    def cuda_graphs(self):
        """--compile on a GPU replays the update from CUDA graphs (CapturedStep, below)."""
        return self.args.compile and self.device.type == "cuda"

    def optimizers(self):
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}


# =================================== environment (Sec. 4.1: the DeepMind Control Suite from pixels)
ACTION_REPEAT = dict(cartpole=8, reacher=4, cheetah=4, finger=2, ball_in_cup=4, walker=2)
DEFAULT_REPEAT = 2  # PlaNet's benchmark, which the paper uses, names the six above
CAMERA_ID = {"quadruped": 2}  # the default camera 0 does not follow the quadruped
EVAL_SEED_OFFSET = 10_000  # the evaluation environment gets seed + this


def load_suite():
    """dm_control.suite, imported at first use (so `import sac_ae` costs nothing)."""
    try:
        from dm_control import suite
    except Exception as e:  # the GL backend named by MUJOCO_GL failed to load
        raise RenderError(e) from None
    return suite


class DMCEnv:
    """A dm_control task as the agent sees it (Sec. 4.1): actions in [-1, 1]^A, repeated; uint8
    (3 * frame_stack, size, size) renders, or float32 states. `step` gives (obs, reward, discount,
    done, env_steps): discount is 0 only at a true terminal, not at the time limit of every task."""

    def __init__(
        self, domain, task, seed, obs="pixels", image_size=84, frame_stack=3, action_repeat=2
    ):
        self.env = load_suite().load(domain, task, task_kwargs={"random": seed})
        self.obs_type, self.image_size, self.action_repeat = obs, image_size, action_repeat
        self.camera_id = CAMERA_ID.get(domain, 0)
        visual, name = self.env.physics.model.vis.global_, f"{domain}-{task}"
        largest = min(visual.offwidth, visual.offheight)  # MuJoCo renders into a buffer this big
        if obs == "pixels" and image_size > largest:
            size = f"{visual.offwidth}x{visual.offheight}"
            raise UsageError(f"--image-size {image_size}: {name} renders up to {size}")
        spec = self.env.action_spec()
        self.action_dim = spec.shape[0]
        self._low, self._high = spec.minimum.astype(np.float32), spec.maximum.astype(np.float32)
        self.frames = collections.deque(maxlen=frame_stack)
        state_dim = sum(size for _, size in self.state_groups)
        self.frame_shape = (3, image_size, image_size) if obs == "pixels" else (state_dim,)
        self.obs_shape = (self.frame_shape[0] * frame_stack, *self.frame_shape[1:])
        limit = self.env._step_limit  # physics steps per episode
        if action_repeat > limit:
            raise UsageError(f"--action-repeat {action_repeat} is longer than {name}'s episodes")
        self.episode_env_steps = round(limit)
        self.episode_length = math.ceil(limit / action_repeat)  # agent steps per episode

    def agent_steps(self, env_steps):
        """Agent steps that take env_steps environment steps (an episode's last may be short)."""
        episodes, rest = divmod(env_steps, self.episode_env_steps)
        return episodes * self.episode_length + math.ceil(rest / self.action_repeat)

    @property
    def state_groups(self):
        """(name, size) of the task's proprioceptive observations, e.g. position, velocity."""
        return [(k, int(np.prod(s.shape))) for k, s in self.env.observation_spec().items()]

    def _frame(self, time_step):
        # The true proprioceptive state, always kept: the linear probe (Fig. 6) reads it.
        values = time_step.observation.values()
        self.state = np.concatenate([np.asarray(v, np.float32).ravel() for v in values])
        if self.obs_type == "state":
            return self.state
        return np.ascontiguousarray(self.render(self.image_size).transpose(2, 0, 1))  # (3, H, W)

    def observation(self):
        return np.concatenate(self.frames, axis=0)  # k x (3, H, W) -> (3k, H, W), oldest first

    def reset(self):
        frame = self._frame(self.env.reset())
        for _ in range(self.frames.maxlen):  # the first frame fills the whole stack
            self.frames.append(frame)
        return self.observation()

    def step(self, action):
        a = np.asarray(action, np.float64) + 1  # to the bounds as dmc2gym does, float32 in and out
        action = (self._low + a * 0.5 * (self._high - self._low)).astype(np.float32)
        reward, env_steps = 0.0, 0
        for _ in range(self.action_repeat):
            time_step = self.env.step(action)
            reward += time_step.reward or 0.0
            env_steps += 1
            if time_step.last():
                break
        self.frames.append(self._frame(time_step))
        return self.observation(), reward, float(time_step.discount), time_step.last(), env_steps

    def render(self, size):  # (size, size, 3) uint8
        try:
            return self.env.physics.render(size, size, camera_id=self.camera_id)
        except Exception as e:
            raise RenderError(e) from None

    def state_dict(self):
        """All to go on mid-episode: physics, task, its RandomState (12 MB, 0.7 once compressed)."""
        return {"env": zlib.compress(pickle.dumps(self.env), 1), "frames": list(self.frames)}

    def load_state_dict(self, state):
        self.env = pickle.loads(zlib.decompress(state["env"]))
        self.frames.extend(state["frames"])  # a deque of maxlen frames: they replace all


# ==================================================================================== replay buffer
class ReplayBuffer:
    """Each frame stored once; stacked observations are rebuilt when sampled.

    Slot t of a ring holds one frame: an episode's first (age 0), or the newest of the observation
    a transition reached, with its action, reward and not-done (age: agent steps into the
    episode). The frame j steps before slot t is at t - min(j, age[t]), which repeats the first
    frame at an episode's start as the environment's stack does. The ring holds `capacity`
    transitions and their first frames, on `storage` (the training GPU when it fits there):
    batches are gathered there, by index."""

    def __init__(
        self, shape, dtype, k, action_dim, capacity, episode_len, seed=0, device="cpu", storage=None
    ):  # shape: one frame's, (3, H, W) or (state_dim,); k frames stacked
        self.frame_shape, self.k, self.capacity = tuple(shape), k, capacity
        self.rng = np.random.default_rng(seed)
        self.device, self.storage = torch.device(device), torch.device(storage or device)
        self.size = capacity + math.ceil(capacity / episode_len) + 1 + k  # slots in the ring
        self.nbytes = self.size * (math.prod(shape) * dtype.itemsize + 4 * (action_dim + 3))
        self.frames = torch.empty((self.size, *shape), dtype=dtype, device=self.storage)
        self.scalars = torch.empty((self.size, action_dim + 2), device=self.storage)  # a, r, d
        self.age = np.zeros(self.size, np.int32)  # on the host: sampling reads it there
        self.t, self.has_transition = 0, False  # slots ever written; slot t is at t % size

    def _write(self, frame, age, scalars=None):
        i = self.t % self.size
        self.frames[i].copy_(torch.from_numpy(frame), non_blocking=True)  # no wait on the GPU
        if scalars is not None:
            self.scalars[i].copy_(torch.from_numpy(scalars), non_blocking=True)
        self.age[i], self.t = age, self.t + 1

    def add_first(self, obs):
        """The first observation of an episode: keep its newest frame."""
        self._write(obs[-self.frame_shape[0] :], 0)

    def add(self, action, reward, not_done, next_obs):
        """A transition: keep the newest frame of next_obs; obs is already in the ring."""
        scalars = np.array([*action, reward, not_done], np.float32)
        age = self.age[(self.t - 1) % self.size] + 1
        self._write(next_obs[-self.frame_shape[0] :], age, scalars)
        self.has_transition = True

    def _valid(self, t):
        """Slots that are transitions whose every frame is still in the ring."""
        age = self.age[t % self.size]
        return (age > 0) & (t - np.minimum(age, self.k) >= self.t - self.size)

    def sample_slots(self, n):
        """n transition slots, uniformly with replacement over the valid ones (by rejection)."""
        if not self.has_transition:  # once there is one, the newest is valid: the loop ends
            raise RuntimeError("the replay buffer holds no transition yet")
        picked = []
        while sum(len(x) for x in picked) < n:
            t = self.rng.integers(max(0, self.t - self.size), self.t, size=2 * n)
            picked.append(t[self._valid(t)])
        return np.concatenate(picked)[:n]

    def get(self, t):
        """Transitions at slots t: (obs, action, reward, next_obs, not_done), tensors on device."""
        b, i = len(t), t % self.size
        back = np.minimum(np.arange(self.k, -1, -1)[None], self.age[i][:, None])  # oldest first
        index = torch.from_numpy(np.concatenate([((t[:, None] - back) % self.size).ravel(), i]))
        index = index.to(self.storage, non_blocking=True)
        frames, scalars = self.frames[index[:-b]], self.scalars[index[-b:]]
        if self.storage != self.device:  # a ring kept in host memory: pinned, then copied over
            frames = frames.pin_memory().to(self.device, non_blocking=True)
            scalars = scalars.pin_memory().to(self.device, non_blocking=True)
        frames = frames.view(b, self.k + 1, *self.frame_shape)  # (B, k+1, C, H, W)
        obs = frames[:, : self.k].reshape(b, -1, *self.frame_shape[1:])  # (B, k*C, H, W)
        next_obs = frames[:, 1:].reshape(b, -1, *self.frame_shape[1:])
        return obs, scalars[:, :-2], scalars[:, -2:-1], next_obs, scalars[:, -1:]

    def sample(self, n):
        return self.get(self.sample_slots(n))


# ======================================================================================= evaluation
def evaluate(env, agent, episodes, video_path=None, probe=False, stop=None):
    """The deterministic policy (tanh of the mean): the episode returns, with probe=True the
    critic's latent and the true state of each observation, and one observation to reconstruct;
    None as soon as `stop` (the training loop's signal flag) is set."""
    returns, frames, latents, states, sample = [], [], [], [], None
    for episode in range(episodes):
        obs, done, total, t = env.reset(), False, 0.0, 0
        while not done:
            if stop:
                return None
            if video_path and episode == 0:
                frames.append(env.render(256))
            if probe:
                latents.append(agent.latent(obs))
                states.append(env.state)
            if episode == 0 and t == 10:
                sample = obs  # far enough in for the three stacked frames to differ
            obs, reward, _, done, _ = env.step(agent.act(obs, deterministic=True))
            total, t = total + reward, t + 1
        returns.append(total)
    if frames:
        imageio.mimsave(video_path, frames, fps=30)
    if probe:
        latents, states = np.stack(latents), np.stack(states)
    return returns, latents, states, sample


def linear_probe(latents, states, groups):
    """Fig. 6: a least-squares map latent -> true state fitted on half the frames, its R^2 on the
    other half per state dimension, averaged overall and per group of the task's state (position,
    velocity, ...); NaN with fewer than 4 frames per coefficient, or where no dimension varies."""
    n = len(latents) // 2
    x = np.concatenate([latents, np.ones((len(latents), 1))], axis=1).astype(np.float64)  # bias
    y = states.astype(np.float64)
    r2 = np.full(y.shape[1], np.nan)
    if n >= 4 * x.shape[1]:  # else the fit would memorise its frames and R^2 mean nothing
        weights, *_ = np.linalg.lstsq(x[:n], y[:n], rcond=None)
        residual = ((y[n:] - x[n:] @ weights) ** 2).sum(0)
        total = ((y[n:] - y[n:].mean(0)) ** 2).sum(0)
        varies = total > 1e-12
        r2[varies] = 1 - residual[varies] / total[varies]
    ends = np.cumsum([0] + [size for _, size in groups])
    parts = {"": r2, **{"_" + name: r2[a:b] for (name, _), a, b in zip(groups, ends, ends[1:])}}
    with warnings.catch_warnings():  # the mean of no finite value is NaN, as meant
        warnings.simplefilter("ignore", RuntimeWarning)
        return {f"probe_r2{key}": float(np.nanmean(part)) for key, part in parts.items()}


def reconstruction_image(obs, recon, frame_channels=3):
    """(k*3, H, W) uint8 observation and its reconstruction in [-0.5, 0.5] -> one (2H, kW, 3) uint8
    picture: the k stacked frames on top, their reconstructions below."""
    rebuilt = np.clip((recon + 0.5) * 255.0, 0, 255).round().astype(np.uint8)
    rows = [im.reshape(-1, frame_channels, *im.shape[1:]) for im in (obs, rebuilt)]  # (k, 3, H, W)
    return np.concatenate([np.concatenate(list(r.transpose(0, 2, 3, 1)), 1) for r in rows], 0)


# ==================================================================================== training loop
@dataclasses.dataclass
class State:
    """Where a run stands: with networks, replay, environments and RNGs, all a checkpoint keeps."""

    env_step: int = 0
    agent_step: int = 0
    updates: int = 0
    episode: int = 0
    episode_return: float = 0.0
    episode_env_steps: int = 0
    last_eval: int = -1  # env step of the last completed evaluation
    last_checkpoint: int = 0  # env step of the last checkpoint
    wall_time: float = 0.0  # seconds the run has taken, up to its last checkpoint
    action: np.ndarray = None  # this agent step's action, chosen before its updates


def updates_due(agent_step, args):
    """Updates due by agent step t: --init-updates at --init-steps, then one a step (authors')."""
    return 0 if agent_step < args.init_steps else args.init_updates + agent_step - args.init_steps


def train(args):
    """The training loop (the authors' train.py): act, update, step the environment, store."""
    with Run(args) as run:
        s, agent, env, replay, stop = run.state, run.agent, run.env, run.replay, run.stop
        while s.env_step < args.total_steps and not stop:
            run.evaluate_if_due(stop)  # at env step 0 and every --eval-freq
            if stop:  # the evaluation was cut short: a resume redoes it
                break
            run.checkpoint(due_only=True)  # every --checkpoint-freq
            # Act: uniform random for the first --init-steps agent steps, then sample the policy.
            if s.action is None and s.agent_step < args.init_steps:
                s.action = run.action_rng.uniform(-1, 1, env.action_dim).astype(np.float32)
            elif s.action is None:
                s.action = agent.act(run.obs)
            # Update: all due by this agent step (the authors' burst too); a signal stops them.
            while s.updates < updates_due(s.agent_step, args) and not stop:
                metrics = agent.update(replay.sample(args.batch_size), s.agent_step)
                run.metrics.add(s.agent_step, metrics)
                s.updates += 1
            if stop:
                break
            # Step the environment with it; store the newest frame, action, reward and not-done.
            run.obs, reward, not_done, done, env_steps = env.step(s.action)
            replay.add(s.action, reward, not_done, run.obs)
            s.agent_step, s.env_step, s.action = s.agent_step + 1, s.env_step + env_steps, None
            s.episode_return += reward
            s.episode_env_steps += env_steps
            if done:
                run.log_episode()  # train.csv, TensorBoard; a NaN loss stops the run here
                run.obs = env.reset()
                replay.add_first(run.obs)
        return run.finish(stop)


class Run(contextlib.AbstractContextManager):  # `with Run(args) as run:` gives the run itself
    """A run's parts: environments, agent, replay buffer, logs, State (--resume restores all)."""

    def __init__(self, args):
        with contextlib.ExitStack() as held:  # undone at once if the set-up fails
            self.held, self.stop = held, stop_on_signal(held)  # below the banner
            self.args, self.device = args, pick_device(args.device)
            seed_everything(args.seed)
            self.action_rng = np.random.default_rng(args.seed)  # the actions of --init-steps
            kw = {k: vars(args)[k] for k in ("obs", "image_size", "frame_stack", "action_repeat")}
            self.env = DMCEnv(args.domain, args.task, args.seed, **kw)
            self.eval_env = DMCEnv(args.domain, args.task, args.seed + EVAL_SEED_OFFSET, **kw)
            self.obs = self.env.reset()  # renders: a GL failure shows here, before the run folder
            if args.save_video:
                self.eval_env.render(8)  # a state run renders its videos only: the same check
            # --buffer-size, or fewer if the run has fewer agent steps (a resume that extends the
            # run grows the ring to what an uninterrupted run of that length would have had).
            capacity = min(args.buffer_size, self.env.agent_steps(args.total_steps))
            self.replay = replay_buffer(self.env, capacity, args.seed, self.device)
            self.agent = SACAE(self.env.obs_shape, self.env.action_dim, self.device, args)
            self.state, self.metrics = State(), EpisodeMetrics(self.device)
            self.logs = Logs(self)  # below the banner: a new run folder, or --resume restores all
            self.start = time.time() - self.state.wall_time
            self.clock = (time.perf_counter(), self.state.env_step)  # for fps
            bar = dict(total=args.total_steps, initial=self.state.env_step, unit=" env steps")
            self.bar = held.enter_context(tqdm.tqdm(**bar, disable=not sys.stdout.isatty()))
            self.held = held.pop_all()  # else undone when training ends

    def __exit__(self, kind, error, traceback):
        with contextlib.suppress(OSError):  # a full disk fails the closing too: reported already
            self.held.close()
        if isinstance(error, NonFiniteError) and "action" in str(error):
            self.metrics.means()  # raises for the NaN or inf loss that came first, if one did

    def evaluate_if_due(self, stop):
        """At env step 0, every --eval-freq and at the end: returns, linear probe (Fig. 6) and a
        reconstruction. A signal cuts it short, to redo on resume."""
        s, args, agent = self.state, self.args, self.agent
        end = s.env_step >= args.total_steps and s.last_eval != s.env_step
        if s.env_step // args.eval_freq <= s.last_eval // args.eval_freq and not end:
            return
        began, pixels = time.perf_counter(), args.obs == "pixels"
        before = self.eval_env.state_dict()
        video = self.logs.path("video", f"eval_{s.env_step}.mp4") if args.save_video else None
        agent.train(False)
        result = evaluate(self.eval_env, agent, args.eval_episodes, video, pixels, stop)
        agent.train(True)
        if result is None:  # cut short by a signal: as if it had not begun
            self.eval_env.load_state_dict(before)
            return
        returns, latents, states, sample = result
        stats = [np.mean(returns), np.std(returns), np.min(returns), np.max(returns)]
        row = dict(env_step=s.env_step, agent_step=s.agent_step, **dict(zip(RETURNS, stats)))
        row.update(episodes=len(returns), wall_time=time.time() - self.start)
        if pixels:
            row.update(linear_probe(latents, states, self.eval_env.state_groups))
        picture = None
        if agent.decoder is not None and sample is not None:
            recon = agent.infer(sample, lambda h: agent.decoder(agent.critic.head(h)))
            picture = reconstruction_image(sample, recon[0].float().cpu().numpy())
        self.logs.write("eval.csv", row, picture)
        s.last_eval = s.env_step
        fps = args.eval_episodes * self.eval_env.episode_env_steps / (time.perf_counter() - began)
        probe = f" | probe R^2 {row['probe_r2']:.2f}" if pixels else ""
        returns = f"return {stats[0]:.1f} +- {stats[1]:.1f}{probe}"
        say(f"[eval] env_step {s.env_step} | {returns} | {fps:.0f} fps")

    def checkpoint(self, due_only=False):
        s, every = self.state, self.args.checkpoint_freq
        if not due_only or s.env_step // every > s.last_checkpoint // every:
            s.last_checkpoint, s.wall_time = s.env_step, time.time() - self.start
            return save_checkpoint(self)  # below the banner

    def log_episode(self):
        """The episode's row: return, length and each metric's mean (raising on a NaN or inf)."""
        s, (began, from_step), now = self.state, self.clock, time.perf_counter()
        fps = (s.env_step - from_step) / (now - began)  # this process's steps, evaluations too
        row = dict(env_step=s.env_step, agent_step=s.agent_step, episode=s.episode)
        row.update(episode_return=s.episode_return, episode_length=s.episode_env_steps)
        row.update(updates=s.updates, **self.metrics.means(), fps=fps)
        self.logs.write("train.csv", {**row, "wall_time": time.time() - self.start})
        say(f"[train] env_step {s.env_step} | episode {s.episode} | return {s.episode_return:.1f}")
        s.episode, s.episode_return, s.episode_env_steps = s.episode + 1, 0.0, 0
        self.metrics.clear()
        self.clock = (now, s.env_step)
        self.bar.update(s.env_step - self.bar.n)  # the progress bar on a terminal: rate, ETA

    def finish(self, stop):
        """With a signal: a checkpoint, and how to resume. Else: the last evaluation, a checkpoint,
        the row of an episode --total-steps cut (an extending resume logs it whole), model.pt."""
        if not stop:
            self.evaluate_if_due(stop)
        path = self.checkpoint()
        if stop:
            say(f"[stopped] {path}; resume with: python {sys.argv[0]} --resume {self.args.out_dir}")
            return 128 + stop[0]
        if self.state.episode_env_steps:
            self.log_episode()
        export_model(self.agent, self.logs.path("model.pt"))
        say(f"[done] {self.state.env_step} env steps in {time.time() - self.start:.0f} s, model.pt")
        return 0


def pick_device(name):
    """torch.device for --device, and the GPU numerics: true float32 (TF32 off, as the authors'
    GPUs; bf16 is the fast mode) and cuDNN's autotuner (fixed shapes; not bit-identical runs)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if device.index is not None:  # cuda:N: streams, CUDA graphs and new tensors go there
            torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    return device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ##################################################################################################
# SAC+AE ends here: all of it, the training loop included, is above. Tooling below, what wraps the
# loop: logs, the run folder, checkpoints and resume, signals, --compile's CUDA graphs,
# --benchmark, --plot, the flags and their checks, and main(), the one error boundary.
# ##################################################################################################
class UsageError(ValueError):
    """A user mistake: one line and exit status 2."""


class NonFiniteError(RuntimeError):
    """A loss, action or parameter became NaN or inf."""


class RenderError(RuntimeError):
    def __init__(self, cause):
        gl = f"MUJOCO_GL={os.environ.get('MUJOCO_GL')}"
        super().__init__(f"rendering with {gl} failed ({cause}); try MUJOCO_GL=egl or osmesa")


class Interrupted(BaseException):  # not an Exception, as KeyboardInterrupt is not
    """A second SIGINT or SIGTERM (its one argument, a signal.Signals): stop at once."""


# ================================================================================ what a run logs
METRICS = "critic_loss q actor_loss alpha_loss alpha entropy ae_loss recon_loss kl".split()
RETURNS = [f"episode_return_{k}" for k in ("mean", "std", "min", "max")]
EVAL_FIELDS = ["env_step", "agent_step", *RETURNS, "episodes", "wall_time"]
TRAIN_FIELDS = "env_step agent_step episode episode_return episode_length updates".split()
TRAIN_FIELDS += [*METRICS, "fps", "wall_time"]
# TensorBoard under CleanRL's names, so that its users find the curves where they expect them.
TAGS = dict(episode_return="charts/episodic_return", fps="charts/SPS", critic_loss="losses/qf_loss")
TAGS.update({k: f"losses/{k}" for k in "actor_loss alpha alpha_loss entropy ae_loss kl".split()})
TAGS.update(episode_return_mean="eval/return", probe_r2="eval/probe_r2")


class Logs:
    """The run folder, new or restored by --resume: config.json, eval.csv, train.csv, tb/."""

    def __init__(self, run):
        from torch.utils.tensorboard import SummaryWriter

        args, r, self.folder = run.args, run.replay, run.args.out_dir
        if args.resume:
            path, s = load_checkpoint(run), run.state
            run.obs, left = run.env.observation(), updates_due(s.agent_step, args) - s.updates
            burst = f", {left:,} of the burst to go" if left > 1 else ""
            say(f"[resume] {os.path.basename(path)}: step {s.env_step}, {s.updates} updates{burst}")
        else:
            if args.load_encoder:
                load_encoder(run.agent, args.load_encoder)
            os.makedirs(self.folder, exist_ok=True)
            r.add_first(run.obs)
        for folder in ["recon"] * (run.agent.decoder is not None) + ["video"] * args.save_video:
            os.makedirs(self.path(folder), exist_ok=True)
        # config.json: every flag, and facts of the process that started or last resumed the run
        ver = {p: importlib.metadata.version(p) for p in "torch numpy dm_control mujoco".split()}
        facts = dict(device_resolved=str(run.device), replay_capacity=r.capacity, versions=ver)
        with atomic_write(self.path("config.json")) as f:
            f.write(json.dumps({**vars(args), **facts}, indent=2).encode())
        probe = ["probe_r2", *(f"probe_r2_{name}" for name, _ in run.eval_env.state_groups)]
        fields = {"eval.csv": EVAL_FIELDS + probe * (args.obs == "pixels")}
        self.files, self.csv = {}, {}
        for name in ("eval.csv", "train.csv"):
            self.files[name] = run.held.enter_context(open(self.path(name), "a", newline=""))
            self.csv[name] = csv.DictWriter(self.files[name], fields.get(name, TRAIN_FIELDS))
            if self.files[name].tell() == 0:
                self.csv[name].writeheader()
        purge = run.state.env_step + 1 if args.resume else None  # events after the checkpoint go
        self.tb = run.held.enter_context(SummaryWriter(self.path("tb"), purge_step=purge))
        task = f"{args.domain}-{args.task} seed {args.seed}, {args.obs}, decoder {args.decoder}"
        replay = f"replay {r.capacity:,} transitions, {r.nbytes / 2**30:.2f} GiB on {r.storage}"
        say(f"[setup] {task}, action repeat {args.action_repeat}, {run.device} | {replay}")

    def path(self, *parts):
        return os.path.join(self.folder, *parts)

    def write(self, name, row, picture=None):
        """A row of eval.csv or train.csv, and its TensorBoard scalars (and image)."""
        text = {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()}
        self.csv[name].writerow(text)
        self.files[name].flush()
        for key in TAGS.keys() & row.keys():
            self.tb.add_scalar(TAGS[key], row[key], row["env_step"])
        if picture is not None:
            with atomic_write(self.path("recon", f"eval_{row['env_step']}.png")) as f:
                f.write(iio.imwrite("<bytes>", picture, extension=".png"))  # encoded in memory
            self.tb.add_image("eval/reconstruction", picture, row["env_step"], dataformats="HWC")
        self.tb.flush()


class EpisodeMetrics:
    """The update metrics of one training episode, kept on the device until its one host sync,
    a row of a preallocated table each (as tensors of their own, a few bytes each, they pinned the
    allocator's heap between the batch's buffers, and resident memory grew with every update)."""

    def __init__(self, device):
        self.table, self.columns = torch.zeros(64, len(METRICS), device=device), {}
        self.clear()

    def clear(self):
        self.steps, self.present = [], []

    def add(self, step, metrics):
        if len(self.steps) == len(self.table):  # grow by doubling: rare allocations
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
        names = tuple(n for n in METRICS if n in metrics)
        if names not in self.columns:  # an index tensor on the device, made once per set of names
            index = [METRICS.index(n) for n in names]
            self.columns[names] = torch.tensor(index, device=self.table.device)
        row = torch.stack([metrics[n].float() for n in names])
        self.table[len(self.steps)].index_copy_(0, self.columns[names], row)
        self.steps.append(step)
        self.present.append(names)

    def means(self):
        """Each metric's mean over the episode; NonFiniteError naming a NaN or inf and its step."""
        table, means = self.table[: len(self.steps)].cpu(), {}
        for j, name in enumerate(METRICS):
            rows = [i for i, names in enumerate(self.present) if name in names]
            for i in (i for i in rows if not table[i, j].isfinite()):
                raise NonFiniteError(f"{name} became {table[i, j]:g} at agent step {self.steps[i]}")
            if rows:
                means[name] = table[rows, j].mean().item()
        return means

    def state_dict(self):
        return dict(steps=self.steps, present=self.present, values=self.table[: len(self.steps)])

    def load_state_dict(self, state):
        self.clear()
        values = state["values"].to(self.table.device)  # once, not row by row
        for step, names, row in zip(state["steps"], state["present"], values):
            self.add(step, {n: row[METRICS.index(n)] for n in names})


# ====================================================================== the run folder and resume
def replay_buffer(env, capacity, seed, device):
    """In GPU memory when it fits there with 2 GiB to spare, else in host memory (said so)."""
    dtype, k = torch.uint8 if env.obs_type == "pixels" else torch.float32, env.frames.maxlen
    shape = (env.frame_shape, dtype, k, env.action_dim, capacity, env.episode_length)
    need, storage = ReplayBuffer(*shape, storage="meta").nbytes / 2**30, device  # sized, not made
    gpu = torch.cuda.mem_get_info(device)[0] / 2**30 if device.type == "cuda" else 0
    if device.type == "cuda" and need + 2 > gpu:
        say(f"[replay] {need:.1f} GiB, and the GPU has {gpu:.1f} free: it is kept in host memory")
        storage = torch.device("cpu")
    free = math.inf  # GiB a new allocation can have, as Linux says
    with contextlib.suppress(OSError, KeyError, ValueError), open("/proc/meminfo") as f:
        free = int(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) / 2**20
    if storage.type == "cpu" and need > free:
        raise UsageError(f"the replay needs {need:.1f} GiB, {free:.1f} free: lower --buffer-size")
    return ReplayBuffer(*shape, seed, device, storage)


@contextlib.contextmanager
def atomic_write(path):
    """Write path.tmp, fsync, rename: a crash at any moment leaves the old file or the new one."""
    try:
        with open(path + ".tmp", "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(path + ".tmp")
        raise
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    os.fsync(fd)  # the rename itself, made durable
    os.close(fd)


def read_file(path):
    """Our own .pt (torch.load) or .npz (np.load) once its zip's CRCs check out, else ValueError."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"not a complete zip file: {e}") from None
    if bad:
        raise ValueError(f"CRC mismatch in {bad}")
    return np.load(path) if path.endswith(".npz") else torch.load(path, "cpu", weights_only=False)


def checkpoints(run_dir, pattern=r"ckpt_(\d+)_(\d+)\.pt"):
    """[(env_step, replay_slots, path)] of a run's checkpoints; of CHUNKS: [(start, end, path)]."""
    folder = os.path.join(run_dir or "", "checkpoints")
    found = [re.fullmatch(pattern, n) for n in os.listdir(folder)] if os.path.isdir(folder) else []
    return sorted((int(m[1]), int(m[2]), os.path.join(folder, m[0])) for m in found if m)


CHECKPOINT_FORMAT, CHUNKS = 3, r"replay_(\d+)_(\d+)\.npz"  # 3: State, frames and scalars


def save_checkpoint(run):
    """New replay slots as a chunk, then all else, atomically; then what none kept needs goes."""
    s, args, replay, folder = run.state, run.args, run.replay, run.logs.path("checkpoints")
    run.metrics.means()  # raises on a NaN or inf loss: never write a poisoned checkpoint
    if not torch.stack([torch.isfinite(p).all() for p in run.agent.parameters()]).all():
        raise NonFiniteError(f"a parameter became NaN or inf by agent step {s.agent_step}")
    for file in run.logs.files.values():  # the rows it counts on disk before it
        file.flush()
        os.fsync(file.fileno())
    csv_bytes = {name: file.tell() for name, file in run.logs.files.items()}
    chunks = checkpoints(args.out_dir, CHUNKS)
    os.makedirs(folder, exist_ok=True)
    start = max([0, replay.t - replay.size, *(end for _, end, _ in chunks)])
    if start < replay.t:
        i = torch.from_numpy(np.arange(start, replay.t) % replay.size)
        frames, scalars = (x[i.to(x.device)].cpu().numpy() for x in (replay.frames, replay.scalars))
        with atomic_write(os.path.join(folder, f"replay_{start:012d}_{replay.t:012d}.npz")) as f:
            np.savez(f, frames=frames, scalars=scalars, age=replay.age[i.numpy()])
    rng = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    rng.update(actions=run.action_rng, replay=replay.rng)  # numpy Generators, pickled whole
    rng["cuda"] = torch.cuda.get_rng_state(run.device) if run.device.type == "cuda" else None
    optimizers = {k: opt.state_dict() for k, opt in run.agent.optimizers().items()}
    payload = dict(format=CHECKPOINT_FORMAT, args=vars(args), state=dataclasses.asdict(s), rng=rng)
    payload.update(agent=run.agent.state_dict(), optimizers=optimizers, csv=csv_bytes)
    payload.update(metrics=run.metrics.state_dict(), env=run.env.state_dict())
    payload["eval_env"] = run.eval_env.state_dict()
    path = os.path.join(folder, f"ckpt_{s.env_step:010d}_{replay.t:012d}.pt")
    with atomic_write(path) as f:
        torch.save(payload, f)
    found = checkpoints(args.out_dir)
    kept = found[-args.keep_checkpoints - 1 :]
    for _, _, old in found[: -len(kept)]:
        os.remove(old)
    for _, end, chunk in checkpoints(args.out_dir, CHUNKS):
        if end <= kept[0][1] - replay.size:  # overwritten in the ring of every kept checkpoint
            os.remove(chunk)
    return path


def load_checkpoint(run):
    """Restore what save_checkpoint wrote; the run folder changes only once all of it is read."""
    args, replay, run_dir = run.args, run.replay, run.args.out_dir
    found, chunks = checkpoints(run_dir), checkpoints(run_dir, CHUNKS)
    (_, slots, path), need = found[-1], max(0, found[-1][1] - replay.size)

    def refuse(problem, usable):  # the newest older checkpoint that does without the problem
        older, fix = [p for _, t, p in found[:-1] if usable(t)], "none older can: start again"
        if older:
            fix = f"move it aside to resume from {os.path.basename(older[-1])}"
        raise UsageError(f"checkpoint {path} {problem}; {fix}")

    try:
        payload = read_file(path)
        version = payload["format"]
    except Exception as e:
        refuse(f"is damaged ({' '.join(str(e).split())})", lambda t: True)
    with open(os.path.join(run_dir, "train.csv")) as f:  # METRICS or CHECKPOINT_FORMAT changed?
        if f.readline().strip() != ",".join(TRAIN_FIELDS) or version != CHECKPOINT_FORMAT:
            raise UsageError(f"{run_dir} is a run of another sac_ae.py: resume with that one")
    theirs = maths_config(argparse.Namespace(**payload["args"]))
    for k in sorted(k for k in theirs.keys() & vars(args).keys() if theirs[k] != vars(args)[k]):
        wrote = f"{vars(args)[k]!r}, but the checkpoint was trained with {theirs[k]!r}"
        raise UsageError(f"config.json says {k} {wrote}: put config.json back as the run wrote it")
    for start, end, chunk in (c for c in chunks if c[0] < slots and c[1] > need):
        if start > need:
            refuse(f"needs replay slots {need}..{start}, which no chunk holds", lambda t: t <= need)
        try:
            with read_file(chunk) as data:
                i = torch.from_numpy(np.arange(need, end) % replay.size).to(replay.storage)
                replay.frames[i] = torch.from_numpy(data["frames"][need - start :]).to(i.device)
                replay.scalars[i] = torch.from_numpy(data["scalars"][need - start :]).to(i.device)
                replay.age[i.cpu().numpy()] = data["age"][need - start :]
        except ValueError as e:
            refuse(f"needs {os.path.basename(chunk)}, which is damaged ({e})", lambda t: t <= need)
        need = end
    if need < slots:
        refuse(f"needs replay slots {need}..{slots}, which no chunk holds", lambda t: t <= need)
    replay.t, ages = slots, replay.age[np.arange(max(0, slots - replay.size), slots) % replay.size]
    replay.has_transition = bool((ages > 0).any())
    # All read: from here on the run is rewound to the checkpoint, its folder too.
    run.agent.load_state_dict(payload["agent"])
    for k, opt in run.agent.optimizers().items():
        opt.load_state_dict(payload["optimizers"][k])
        for group in opt.param_groups:  # the checkpoint's run may have had other flags
            group["capturable"] = run.agent.cuda_graphs
    run.env.load_state_dict(payload["env"])
    run.eval_env.load_state_dict(payload["eval_env"])
    rng = payload["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    run.action_rng, replay.rng = rng["actions"], rng["replay"]
    if rng["cuda"] is not None and run.device.type == "cuda":  # a run from a CPU: CUDA's afresh
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    for _, _, chunk in (c for c in chunks if c[0] >= slots):  # written after it, by the run itself
        os.remove(chunk)
    for log, size in payload["csv"].items():  # drop the rows written after the checkpoint
        os.truncate(os.path.join(run_dir, log), size)
    run.state = State(**payload["state"])
    run.metrics.load_state_dict(payload["metrics"])
    return path


def export_model(agent, path):
    """RUN_DIR/model.pt: the trained networks alone, for torch.load(..., weights_only=True)."""
    weights = {k: t.cpu() for k, t in agent.state_dict().items()}  # loads without a GPU
    with atomic_write(path) as f:
        torch.save({"agent": weights, "config": maths_config(agent.args)}, f)


def load_encoder(agent, path):
    """--load-encoder (Fig. 7): the encoder and both latent heads of a model.pt or checkpoint."""
    file = os.path.join(path, "model.pt") if os.path.isdir(path) else path
    try:
        saved = read_file(file)
        weights, config = saved["agent"], saved.get("config") or saved["args"]
        if config["obs"] == "state":
            raise ValueError("a SAC:state run has no encoder to give")
        parts = ("encoder.", "critic.head.", "actor.head.")
        agent.load_state_dict({k: v for k, v in weights.items() if k.startswith(parts)}, False)
        agent.encoder_target.load_state_dict(agent.encoder.state_dict())
        agent.critic_target.head.load_state_dict(agent.critic.head.state_dict())
    except Exception as e:  # load_state_dict's lines after its first each name a difference
        why = (str(e).splitlines()[1:] or [repr(e)])[0].strip()
        why = f"--load-encoder {path}: no encoder for this run in {file}: {why}"
        raise UsageError(why) from None


# ====================================================================== signals, console, progress
def stop_on_signal(held):
    """The list the loop reads: a SIGINT or SIGTERM in it asks for a checkpoint; a second, out."""
    stop = []

    def handler(signum, frame):
        if stop:
            raise Interrupted(signal.Signals(signum))
        stop.append(signal.Signals(signum))

    for s in (signal.SIGINT, signal.SIGTERM):
        held.callback(signal.signal, s, signal.signal(s, handler))
    return stop


def say(line):
    """A console line. When the console has gone (`| head`, or sys.stdout closed), the run goes
    on, printing nowhere."""
    try:
        tqdm.tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # ValueError: sys.stdout was closed
        sys.stdout = open(os.devnull, "w")  # once: the next lines raise nothing


# ====================================================================== --compile and CUDA graphs
def compiled_step(agent, parts):
    """update_step with these parts, torch.compiled at first use (as LeanRL); on a GPU, graphed."""
    key = tuple(parts.values())
    if key in agent.compiled:
        return agent.compiled[key]
    # torch 2.13 on CPU sometimes crashed (SIGSEGV) writing AOTAutograd's on-disk cache.
    torch._functorch.config.enable_autograd_cache = False
    name = "update with critic" + "".join(", " + k[3:] for k, on in parts.items() if on)
    step = torch.compile(functools.partial(agent.update_step, **parts))
    if agent.cuda_graphs:
        if not agent.compiled:  # one memory pool and capture stream for all variants
            pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(agent.device)
            agent.graphs = {"pool": pool, "stream": stream, "failed": False}
        step = CapturedStep(step, agent.device, name, agent.graphs)
    agent.compiled[key] = step

    def first_call(*batch):
        began = time.perf_counter()
        metrics = step(*batch)
        say(f"[compile] {name}: compiled in {time.perf_counter() - began:.1f} s")
        return metrics

    return first_call


class CapturedStep:
    """fn replayed from a CUDA graph, its kernels launched as one (LeanRL's CudaGraphModule). fn
    keeps its state in place (capturable Adam) and reads its arguments, copied into buffers of
    fixed address and layout (torch.compile's guards see the same inputs). The first calls warm
    up on a side stream, one records, later ones replay. Variants share `graphs`: a memory pool,
    a capture stream, and whether a capture failed (then those not yet captured never are)."""

    def __init__(self, fn, device, name, graphs, warmup=3):
        self.fn, self.device, self.name, self.graphs, self.warmup = fn, device, name, graphs, warmup
        self.calls, self.inputs, self.graph, self.outputs = 0, None, None, None

    def __call__(self, *args):
        if self.inputs is None:
            self.inputs = [torch.empty_like(x, memory_format=torch.contiguous_format) for x in args]
        torch._foreach_copy_(self.inputs, list(args))
        if self.graph is not None:
            self.graph.replay()
            return self.outputs
        if self.graphs["failed"]:
            return self.fn(*self.inputs)
        self.calls += 1
        stream = torch.cuda.current_stream(self.device)
        if self.calls <= self.warmup:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            with torch.cuda.stream(side), warnings.catch_warnings():
                # Adam warns that capturable=True is slower uncaptured: these calls only warm up.
                warnings.filterwarnings("ignore", "This instance was constructed with capturable")
                outputs = self.fn(*self.inputs)
            stream.wait_stream(side)
            return outputs
        began, graph = time.perf_counter(), torch.cuda.CUDAGraph()
        # A recompile cannot be captured: refused by name, with the guard that failed.
        no_recompile = torch._dynamo.config.patch(error_on_recompile=True)
        pool, capture_stream = self.graphs["pool"], self.graphs["stream"]
        capture = torch.cuda.graph(graph, pool, capture_stream, capture_error_mode="thread_local")
        try:
            with no_recompile, capture:
                outputs = self.fn(*self.inputs)  # recorded, not run
        except RuntimeError as e:  # torch.AcceleratorError included
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
            self.graphs["failed"] = True
            why = str(e.__context__ or e).splitlines()[0]  # the call the capture refused, if one
            say(f"[compile] {self.name}: CUDA-graph capture failed ({why}); it runs uncaptured")
            return self.fn(*self.inputs)  # this call's update, uncaptured
        self.graph, self.outputs = graph, outputs
        say(f"[compile] {self.name}: CUDA graph captured in {time.perf_counter() - began:.1f} s")
        self.graph.replay()  # this call's update
        return self.outputs


# ====================================================================================== --benchmark
def benchmark(args):
    """Time updates on a replay buffer of random frames, and environment steps: two lines."""
    device = pick_device(args.device)
    seed_everything(args.seed)
    kw = {k: vars(args)[k] for k in ("obs", "image_size", "frame_stack", "action_repeat")}
    env = DMCEnv(args.domain, args.task, args.seed, **kw)
    agent = SACAE(env.obs_shape, env.action_dim, device, args)
    replay = replay_buffer(env, min(args.buffer_size, 10 * env.episode_length), args.seed, device)
    rng, dtype = np.random.default_rng(args.seed), np.uint8 if args.obs == "pixels" else np.float32
    for i in range(replay.capacity):
        obs = rng.integers(0, 256, env.obs_shape).astype(dtype)
        if i % env.episode_length == 0:
            replay.add_first(obs)
        replay.add(rng.uniform(-1, 1, env.action_dim), rng.random(), 1.0, obs)

    def ms_per_call(fn, steps):
        began = time.perf_counter()
        for step in steps:
            fn(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - began) * 1000 / len(steps)

    def update(step):
        agent.update(replay.sample(args.batch_size), step)

    warmup, n = 4 + 6 * args.compile, args.bench_updates  # one-off costs: plans, compiling, capture
    ms_per_call(update, range(warmup))
    ms = ms_per_call(update, range(warmup, warmup + n))
    sampling = ms_per_call(lambda step: replay.sample(args.batch_size), range(n))
    env.reset()  # and 20 agent steps, rendering included (no episode is as short)
    ms_env = ms_per_call(lambda step: env.step(rng.uniform(-1, 1, env.action_dim)), range(20))
    sps, name, mode = 1000 * args.action_repeat / ms_env, "cpu", args.precision
    peak = f"peak memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"
    if device.type == "cuda":
        name = "cuda:" + torch.cuda.get_device_name(device).replace(" ", "_")
        peak += f", GPU memory {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved"
    if args.compile:  # and on a GPU, how many variants replay from a CUDA graph
        graphs = [step.graph is not None for step in agent.compiled.values() if agent.cuda_graphs]
        mode += f" + compile, CUDA graphs for {sum(graphs)} of {len(agent.compiled)} variants"
    print(
        f"{args.domain}-{args.task} {args.obs}, batch {args.batch_size}, {name}, {mode}, "
        f"{torch.get_num_threads()} threads: {ms:.1f} ms per update, {sampling:.1f} of it "
        f"sampling; {sps:.0f} env steps per second; {peak}\nbenchmark ms_per_update={ms:.3f} "
        f"updates_per_s={1000 / ms:.3f} env_steps_per_s={sps:.1f} replay_bytes_per_transition="
        f"{round(replay.nbytes / replay.capacity)} device={name} precision={args.precision}"
    )


# =========================================================================================== --plot
# SAC+AE:pixel's published returns at 100k, 500k env steps: DrQ's Table 1, then CURL's Table 1.
PUBLISHED = dict(cartpole_swingup=(276, 730, 311, 735), reacher_easy=(225, 601, 274, 627))
PUBLISHED.update(cheetah_run=(240, 544, 267, 550), finger_spin=(747, 914, 740, 884))
PUBLISHED.update(ball_in_cup_catch=(338, 810, 391, 794), walker_walk=(395, 858, 394, 847))


def read_eval_csv(path):
    """(env_step, mean, std) arrays of an eval.csv; UsageError if it is not one."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = ("env_step", "episode_return_mean", "episode_return_std")
        table = np.array([[float(r[c]) for c in columns] for r in rows]).reshape(-1, 3)
    except (OSError, KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error) as e:
        why = f"--plot {path}: no eval.csv of sac_ae.py ({type(e).__name__}: {e})"
        raise UsageError(why) from None
    if not len(table):
        raise UsageError(f"--plot {path}: no evaluation rows yet")
    return table.T


def plot(paths):
    """learning_curve.png where the eval.csv given are: a curve per task and mode, the mean over
    runs and a band of +-1 std across them (one run's: across episodes), the published points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}  # label: each run's (env_step, mean, std)
    for path in paths:
        curves.setdefault(run_label(path), []).append(read_eval_csv(path))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, runs in curves.items():
        steps = sorted(set.intersection(*(set(x) for x, _, _ in runs)))  # evaluated in every run
        y = np.array([[dict(zip(x, mean))[t] for t in steps] for x, mean, _ in runs])
        spread = y.std(0) if len(runs) > 1 else runs[0][2]
        line = ax.plot(steps, y.mean(0), "o-", ms=3, label=f"{label}: {len(runs)} run(s)")[0]
        band, color = (y.mean(0) - spread, y.mean(0) + spread), line.get_color()
        ax.fill_between(steps, *band, alpha=0.2, color=color)
        task = label.split(",")[0].replace("-", "_")
        if task in PUBLISHED:
            ax.plot([1e5, 5e5] * 2, PUBLISHED[task], "x", color=color, label="published")
    ax.set(xlabel="environment steps", ylabel="evaluation return", ylim=(0, 1000))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    folder = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
    out = os.path.join(folder, "learning_curve.png")
    fig.savefig(out, bbox_inches="tight")
    print(f"[plot] {out}: {len(paths)} eval.csv, {len(curves)} curve(s)")


def run_label(path):
    """'cheetah-run, SAC+AE' from the run's config.json, else the name of its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(os.path.join(folder, "config.json")) as f:
            c = json.load(f)
        mode = {"pixel": "SAC+AE", "none": "SAC:pixel", "vae": "SAC+VAE"}[c["decoder"]]
        return f"{c['domain']}-{c['task']}, {'SAC:state' if c['obs'] == 'state' else mode}"
    except (OSError, ValueError, KeyError, TypeError):
        return os.path.basename(folder)


# ====================================================================== flags: the manual is --help
# fmt: off
# One flag a line, the card of the script: the formatter leaves this section as written.
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main()'s error boundary, not a usage dump
        raise UsageError(message)

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # a default resolved later says so in its help: [...]
        return action.help if action.default is None else super()._get_help_string(action)

def checked(convert, valid, what):
    """An argparse type: convert the text and refuse what is not `valid`, saying what it must be."""
    def parse(text):
        with contextlib.suppress(ValueError):
            if valid(value := convert(text)):
                return value
        raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'")
    return parse

count = checked(int, lambda v: v > 0, "a positive integer")
seed = checked(int, lambda v: 0 <= v < 2**32 - EVAL_SEED_OFFSET, "an integer in [0, 2^32 - 10001]")
positive = checked(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
fraction = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
beta = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1), as Adam needs")
finite = checked(float, math.isfinite, "a finite number")
device = checked(str, lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu or cuda[:N]")
RESUMABLE, MODES = "run: these may change on --resume", "run folder and modes"

def build_parser():
    p = Parser(prog="sac_ae.py", formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0]
               + " Every default is the paper's or the authors' code's; budgets count env steps.")
    repeats = ", ".join(f"{k} {v}" for k, v in ACTION_REPEAT.items()) + f", else {DEFAULT_REPEAT}"
    g = p.add_argument_group("task")
    g.add_argument("--domain", default="cheetah", help="dm_control suite domain")
    g.add_argument("--task", default="run", help="task of that domain")
    g.add_argument("--seed", type=seed, default=1, help="seeds python, numpy, torch, environments")
    g.add_argument("--obs", default="pixels", choices=["pixels", "state"], help="state: SAC:state")
    g.add_argument("--decoder", choices=["pixel", "vae", "none"],
                   help="pixel: SAC+AE; vae: beta-VAE (Eq. 4); none: SAC:pixel [pixel if pixels]")
    g = p.add_argument_group(RESUMABLE)
    g.add_argument("--total-steps", type=count, default=500_000, help="environment steps to train")
    g.add_argument("--device", type=device, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--checkpoint-freq", type=count, help="env steps per checkpoint [eval-freq]")
    g.add_argument("--keep-checkpoints", type=checked(int, lambda v: v >= 0, "an integer >= 0"),
                   default=1, help="older checkpoints kept besides the latest")
    g.add_argument("--save-video", action="store_true", help="mp4 of each evaluation's 1st episode")
    g = p.add_argument_group(MODES)
    g.add_argument("--out-dir", help="run folder, new or empty [runs/DOMAIN-TASK-sSEED-TIME]")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue that run from its last checkpoint")
    g.add_argument("--benchmark", action="store_true", help="time updates and env steps, then exit")
    g.add_argument("--bench-updates", type=count, default=20, help="updates --benchmark times")
    g.add_argument("--plot", nargs="+", metavar="EVAL_CSV", help="draw learning curves, then exit")
    g = p.add_argument_group("environment")
    g.add_argument("--action-repeat", type=count, help=f"times an action is applied [{repeats}]")
    g.add_argument("--frame-stack", type=count, help="frames stacked [3 for pixels, 1 for states]")
    g.add_argument("--image-size", type=count, default=84, help="side of the square frames")
    g = p.add_argument_group("replay and schedule")
    g.add_argument("--buffer-size", type=count, default=1_000_000, help="replay capacity")
    g.add_argument("--init-steps", type=count, default=1000, help="agent steps of random actions")
    g.add_argument("--init-updates", type=count, help="updates at once after them [init-steps]")
    g.add_argument("--batch-size", type=count, default=128, help="transitions per update")
    g.add_argument("--eval-freq", type=count, default=10_000, help="env steps between evaluations")
    g.add_argument("--eval-episodes", type=count, default=10, help="episodes per evaluation")
    g = p.add_argument_group("speed")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast")
    g.add_argument("--compile", action="store_true", help="torch.compile; on a GPU, CUDA graphs")
    g = p.add_argument_group("SAC")
    g.add_argument("--gamma", type=fraction, default=0.99, help="discount")
    g.add_argument("--critic-lr", type=positive, default=1e-3, help="Adam lr, critic and encoder")
    g.add_argument("--critic-beta", type=beta, default=0.9, help="Adam beta1 of the critic")
    g.add_argument("--critic-tau", type=fraction, default=0.01, help="target rate: Q1, Q2")
    g.add_argument("--encoder-tau", type=fraction, default=0.05, help="target rate: convs, z head")
    g.add_argument("--target-update-freq", type=count, default=2, help="targets every N steps")
    g.add_argument("--actor-lr", type=positive, default=1e-3, help="Adam lr of the actor")
    g.add_argument("--actor-beta", type=beta, default=0.9, help="Adam beta1 of the actor")
    g.add_argument("--actor-update-freq", type=count, default=2, help="actor, alpha every N steps")
    g.add_argument("--actor-log-std-min", type=finite, default=-10.0, help="policy log std bound")
    g.add_argument("--actor-log-std-max", type=finite, default=2.0, help="policy log std bound")
    g.add_argument("--init-temperature", type=positive, default=0.1, help="initial alpha")
    g.add_argument("--alpha-lr", type=positive, default=1e-4, help="Adam lr of log alpha")
    g.add_argument("--alpha-beta", type=beta, default=0.5, help="Adam beta1 of log alpha")
    g.add_argument("--hidden-dim", type=count, default=1024, help="width of actor and Q MLPs")
    g = p.add_argument_group("encoder and autoencoder")
    g.add_argument("--feature-dim", type=count, default=50, help="latent size z")
    g.add_argument("--num-filters", type=count, default=32, help="channels of each conv layer")
    g.add_argument("--num-conv-layers", type=count, default=4, help="convs of encoder, decoder")
    g.add_argument("--encoder-lr", type=positive, default=1e-3, help="Adam lr, encoder's AE step")
    g.add_argument("--decoder-lr", type=positive, default=1e-3, help="Adam lr of the decoder")
    g.add_argument("--decoder-weight-decay", type=nonnegative, default=1e-7, help="L2, decoder")
    g.add_argument("--decoder-latent-lambda", type=nonnegative, default=1e-6, help="on |z|^2/2")
    g.add_argument("--ae-update-freq", type=count, default=1, help="autoencoder every N steps")
    g.add_argument("--ae-bits", type=checked(int, lambda v: 1 <= v <= 8, "an integer in [1, 8]"),
                   default=5, help="bit depth of the reconstruction target")
    g.add_argument("--ae-grad", default="end-to-end", choices=["end-to-end", "separate"],
                   help="separate: only reconstruction trains the encoder (Sec. 4.3)")
    g.add_argument("--vae-beta", type=nonnegative, default=1e-6, help="KL weight, --decoder vae")
    g.add_argument("--load-encoder", metavar="PATH", help="encoder and heads of a run (Fig. 7)")
    g.add_argument("--freeze-encoder", action="store_true", help="keep the loaded encoder fixed")
    return p

@functools.cache
def group(title):
    """The flags (dests) under one heading of --help: the headings say what may change on resume."""
    groups = build_parser()._action_groups
    return {a.dest for g in groups if g.title == title for a in g._group_actions}

def maths_config(args):
    """What a run's checkpoints must agree on: every flag but how long, where and the modes."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in group(RESUMABLE) | group(MODES)}

def parse_args(argv=None):
    """Parse and check all that can be checked before building anything (UsageError)."""
    parser, typer = build_parser(), build_parser()
    args = parser.parse_args(argv)
    typer.set_defaults(**dict.fromkeys(vars(args)))  # so that only what argv gives is not None
    typed = {k for k, v in vars(typer.parse_args(argv)).items() if v is not None}
    for k in sorted(typed - {"plot"} if args.plot else ()):
        raise UsageError(f"--{k.replace('_', '-')} has no effect: --plot only draws")
    if args.resume is not None:
        args = resume_args(args.resume, typed, vars(args))
    elif not args.plot:
        resolve_args(args)
    gpus = torch.cuda.device_count()
    if args.device.startswith("cuda") and int(args.device.partition(":")[2] or 0) >= gpus:
        raise UsageError(f"--device {args.device}, but {gpus} CUDA device(s) are visible")
    return args

def resume_args(run_dir, typed, given):
    """The run's flags from config.json (a newer flag: its default), and any that may change."""
    config = os.path.join(run_dir, "config.json")
    for wrong, why in [(typed - group(RESUMABLE) - {"resume"}, "cannot be given with --resume"),
                       (not run_dir.strip(), "is empty: give a run folder"),
                       (not os.path.isdir(run_dir), "is no folder"),
                       (not os.access(run_dir, os.W_OK | os.X_OK), "is read-only"),
                       (not os.path.isfile(config), "has no config.json"),
                       (not checkpoints(run_dir), "has no checkpoint")]:
        if wrong and why[0] == "c":  # a flag that is the run's own, not this command's
            flag = "--" + sorted(wrong)[0].replace("_", "-")
            raise UsageError(f"{flag} {why}: only the flags under '{RESUMABLE}' may")
        if wrong:
            raise UsageError(f"--resume {run_dir} {why}".replace("  ", " "))
    try:
        with open(config) as f:
            saved = dict(json.load(f))
    except (OSError, ValueError, TypeError) as e:
        raise UsageError(f"{config} is damaged ({e}); restore it, or start again") from None
    merged = {**vars(build_parser().parse_args([])), **saved}
    args = argparse.Namespace(**{k: merged[k] for k in given})
    vars(args).update({k: given[k] for k in typed & group(RESUMABLE)}, out_dir=run_dir)
    args.resume = run_dir
    last = checkpoints(run_dir)[-1][0]
    if last >= args.total_steps + args.action_repeat:  # its last step may overshoot
        raise UsageError(f"--total-steps {args.total_steps}: the run is already at env step "
                         f"{last}; give at least that")
    return args

def resolve_args(args):
    """Fill the defaults that depend on the task, and refuse inconsistent input (UsageError)."""
    tasks = load_suite().ALL_TASKS
    domains, path, pixels = sorted({d for d, _ in tasks}), args.load_encoder, args.obs == "pixels"
    args.decoder = args.decoder or ("pixel" if pixels else "none")
    for wrong, why in [
        (args.domain not in domains, f"unknown domain '{args.domain}'; valid: {', '.join(domains)}"
         ),
        ((args.domain, args.task) not in tasks, f"unknown task '{args.task}' for domain "
         f"{args.domain}; valid: {', '.join(t for d, t in sorted(tasks) if d == args.domain)}"),
        (not pixels and args.decoder != "none", f"--decoder {args.decoder} needs --obs pixels"),
        (not pixels and (path or args.freeze_encoder), "--load-encoder needs --obs pixels"),
        (args.freeze_encoder and not path, "--freeze-encoder needs --load-encoder PATH"),
        (path and not os.path.exists(path), f"--load-encoder {path}: no such file or folder"),
        (path and os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model.pt")),
         f"--load-encoder {path}: no model.pt in it yet; give one of its checkpoints/ckpt_*.pt"),
        (args.ae_grad == "separate" and args.decoder == "none", "--ae-grad separate: no decoder"),
        (args.benchmark and args.bench_updates % 2, "--bench-updates must be even (actor and "
         f"targets move every 2nd update), got {args.bench_updates}"),
        (args.actor_log_std_min >= args.actor_log_std_max, "--actor-log-std-min is not below max"),
        (pixels and conv_output_size(args.image_size, args.num_conv_layers) < 1, f"--image-size "
         f"{args.image_size} is too small for {args.num_conv_layers} conv layers"),
    ]:
        if wrong:
            raise UsageError(why)
    args.load_encoder = path and os.path.abspath(path)
    args.action_repeat = args.action_repeat or ACTION_REPEAT.get(args.domain, DEFAULT_REPEAT)
    args.frame_stack = args.frame_stack or (3 if pixels else 1)
    args.init_updates = args.init_updates or args.init_steps
    args.checkpoint_freq = args.checkpoint_freq or args.eval_freq
    if args.benchmark:
        return
    stamp = f"{args.domain}-{args.task}-s{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = args.out_dir = os.path.join("runs", stamp) if args.out_dir is None else args.out_dir
    parent = os.path.abspath(out)
    while not os.path.exists(parent):  # the nearest part of the path that exists
        parent = os.path.dirname(parent)
    for wrong, why in [  # a run folder must be new or empty, and makeable: refused now, not later
        (not out.strip(), "is empty; give a folder name"),
        (os.path.isfile(out), "is a file; give a new folder"),
        (os.path.islink(out) and not os.path.exists(out), "is a link to nothing"),
        (os.path.isdir(out) and os.listdir(out), "already exists and is not empty"),
        (not os.path.isdir(parent), f"is in {parent}, a file"),
        (not os.access(parent, os.W_OK | os.X_OK), f"cannot be made in {parent} (read-only?)"),
    ]:
        if wrong:
            raise UsageError(f"--out-dir {out} {why}".replace("  ", " "))

# ========================================================================= main: the one boundary
def main(argv=None):
    """The command line. Every mistake and fault ends here in one line on stderr and an exit
    status: 2 for a mistake, 1 for a fault, 128 + N for signal N; a bug keeps its traceback."""
    args = None  # dm_control's noise: MuJoCo's deprecations in the suite's XML, GLFW's no display
    logging.getLogger("absl").filters = [lambda r: "deprecated" not in r.getMessage()]
    logging.getLogger("torch._dynamo.variables.ctx_manager").setLevel(logging.ERROR)  # Adam's hook
    warnings.filterwarnings("ignore", module="glfw")  # the one error line says what failed
    # TensorBoard's writer thread re-raises its OSError here, at its next write: reported once.
    threading.excepthook = lambda a: issubclass(a.exc_type, OSError) or threading.__excepthook__(a)
    try:
        args = parse_args(argv)
        if args.plot:
            return plot(args.plot)
        return benchmark(args) if args.benchmark else train(args)
    except (Exception, KeyboardInterrupt, Interrupted) as e:
        line, code = explain(e, args)
        if line is None:
            raise
        print(f"sac_ae.py: error: {line}", file=sys.stderr)
        sys.unraisablehook = lambda _: None  # half-made GL contexts' finalizers: nothing to add
        return code

def explain(e, args):
    """The one line and exit status of a mistake or a fault, from one table; (None, None) else."""
    run_dir = args.out_dir if args is not None and not (args.benchmark or args.plot) else None
    last, folder = checkpoints(run_dir)[-1:], run_dir and os.path.isdir(run_dir)
    then = (f"the last checkpoint {last[0][2]} is intact: resume with python {sys.argv[0]} "
            f"--resume {run_dir}" if last else f"no checkpoint was written: remove {run_dir} and "
            "start again" if folder else "nothing was written")
    if type(e) is RuntimeError and isinstance(e.__context__, OSError):
        e = e.__context__  # torch.save's zip writer reports a failed write so
    text, errno = " ".join(str(e).split()), getattr(e, "errno", 0)
    sig = e.args[0] if isinstance(e, Interrupted) else signal.SIGINT
    file = str(getattr(e, "filename", None) or "the run folder")
    what = f"writing {file} failed: {getattr(e, 'strerror', None) or text}"
    fix = {28: "free some space", 30: "make the disk writable", 13: "fix the permissions"}
    model = " (and it writes model.pt again)" * file.endswith("model.pt.tmp")
    for fault, code, line in [
        (isinstance(e, UsageError), 2, text),
        (isinstance(e, RenderError), 1, text),
        (isinstance(e, Interrupted), 128 + sig, f"a second {sig.name}: stopped at once; {then}"),
        (isinstance(e, KeyboardInterrupt), 130, f"interrupted; {then}"),
        (isinstance(e, NonFiniteError), 1, f"{text}; stopped before the simulator; {then}"),
        (isinstance(e, OSError) and run_dir and not folder, 1, f"{what}: {run_dir} is gone"),
        (isinstance(e, OSError), 1, f"{what}; {fix.get(errno, 'fix that')}; {then}{model}"),
        (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text, 1,
         f"out of memory ({text}); lower --hidden-dim, --batch-size, --image-size, --buffer-size"),
        (type(e).__name__ == "PhysicsError", 1, f"the simulation became unstable ({text}); try "
         "another --seed or a lower lr"),
    ]:
        if fault:
            return line, code
    return None, None
# fmt: on


if __name__ == "__main__":
    sys.exit(main())
