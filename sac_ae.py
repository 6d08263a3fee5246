"""SAC+AE: soft actor-critic from pixels, made stable by a regularized autoencoder.

Yarats et al., "Improving Sample Efficiency in Model-Free Reinforcement Learning from Images"
(arXiv 1910.01741). A conv encoder is shared by the critic and a deterministic decoder: the
critic's and the decoder's gradients shape it, the actor's never do (Sec. 5). The file reads in
the order a run happens: networks, the agent and its update, environment, replay buffer,
evaluation, the training loop. Below the banner: checkpoints and resume, flags, --benchmark,
--plot, main().

    python sac_ae.py --domain cheetah --task run --seed 3
"""

import argparse
import collections
import contextlib
import copy
import csv
import dataclasses
import functools
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import threading
import time
import warnings
import zipfile
import zlib

import numpy as np
import torch
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


def mlp(in_dim, hidden_dim, out_dim):
    layers = [nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, hidden_dim)]
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(hidden_dim, out_dim))


def latent_head(in_dim, feature_dim):
    """Linear -> LayerNorm -> tanh: conv features to a bounded latent z (Fig. 4)."""
    return nn.Sequential(nn.Linear(in_dim, feature_dim), nn.LayerNorm(feature_dim), nn.Tanh())


class Encoder(nn.Module):
    """The conv layers that the critic, the actor and the decoder's gradient share.

    Pixels: (B, 9, 84, 84) in [0, 1] -> (B, 32 * 35 * 35) features. States (SAC:state): identity.
    """

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
        self.policy = mlp(feature_dim if pixels else repr_dim, hidden_dim, 2 * action_dim)
        self.log_std_min, self.log_std_max = log_std_bounds

    def forward(self, h):  # (B, 39200) conv features -> mean, log_std, each (B, A)
        mu, log_std = self.policy(self.head(h)).chunk(2, dim=-1)
        # tanh, then affine onto [log_std_min, log_std_max]: a soft clamp (authors' code).
        lo, hi = self.log_std_min, self.log_std_max
        log_std = lo + 0.5 * (hi - lo) * (log_std.tanh() + 1)
        return mu.float(), log_std.float()  # float32 even under bf16: log-probabilities need it


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
    """Its latent head z = head(h), then two Q networks on concat(z, a) (clipped double Q).

    z is the latent that the decoder reconstructs from. With --decoder vae, log_var gives the
    posterior's log-variance around the mean z (Sec. 4).
    """

    def __init__(self, repr_dim, feature_dim, action_dim, hidden_dim, pixels=True, vae=False):
        super().__init__()
        self.head = latent_head(repr_dim, feature_dim) if pixels else nn.Identity()
        z_dim = feature_dim if pixels else repr_dim
        self.Q1 = mlp(z_dim + action_dim, hidden_dim, 1)
        self.Q2 = mlp(z_dim + action_dim, hidden_dim, 1)
        self.log_var = nn.Linear(repr_dim, feature_dim) if vae else None

    def forward(self, h, action, detach_z=False):  # (B, 39200), (B, A) -> (B, 1), (B, 1)
        z = self.head(h)
        za = torch.cat([z.detach() if detach_z else z, action], dim=-1)
        return self.Q1(za), self.Q2(za)


class Decoder(nn.Module):
    """z -> reconstructed observation: the encoder mirrored with transposed convs (Fig. 4)."""

    def __init__(self, out_channels, image_size, feature_dim=50, num_filters=32, num_layers=4):
        super().__init__()
        self.side = conv_output_size(image_size, num_layers)
        self.num_filters = num_filters
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
class SACAE:
    """SAC whose critic's encoder is also trained to reconstruct its input (SAC+AE).

    Networks: encoder (shared convs), actor and critic (each with its own latent head), decoder;
    the targets encoder_target and critic_target; the temperature alpha = exp(log_alpha).
    """

    def __init__(self, obs_shape, action_dim, device, args):
        self.args, self.device = args, device
        pixels, dims = args.obs == "pixels", (args.feature_dim, action_dim, args.hidden_dim)
        self.encoder = Encoder(obs_shape, args.num_filters, args.num_conv_layers, pixels)
        log_std_bounds = (args.actor_log_std_min, args.actor_log_std_max)
        self.actor = Actor(self.encoder.repr_dim, *dims, log_std_bounds, pixels)
        self.critic = Critic(self.encoder.repr_dim, *dims, pixels, vae=args.decoder == "vae")
        self.decoder = None
        if args.decoder in ("pixel", "vae"):
            conv = (args.feature_dim, args.num_filters, args.num_conv_layers)
            self.decoder = Decoder(obs_shape[0], args.image_size, *conv)
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
        self.log_alpha = torch.tensor(math.log(args.init_temperature))
        self.target_entropy = -float(action_dim)  # -|A| (SAC's heuristic)
        self.to(device)

        def adam(params, lr, beta1=0.9, weight_decay=0.0):  # fused: one kernel per step
            params = [p for p in params if p.requires_grad]
            if not params:  # --freeze-encoder leaves the encoder's optimizer nothing to move
                return None
            capturable = self.cuda_graphs  # CUDA graphs need Adam's step counts on the GPU
            return torch.optim.Adam(
                params,
                lr,
                (beta1, 0.999),
                weight_decay=weight_decay,
                fused=True,
                capturable=capturable,
            )

        # The critic's optimizer moves the encoder too; the actor's never does (Sec. 5).
        critic_params = [*self.encoder.parameters(), *self.critic.parameters()]
        self.critic_opt = adam(critic_params, args.critic_lr, args.critic_beta)
        self.actor_params = [p for p in self.actor.parameters() if p.requires_grad]
        self.actor_opt = adam(self.actor_params, args.actor_lr, args.actor_beta)
        self.log_alpha_opt = adam([self.log_alpha], args.alpha_lr, args.alpha_beta)
        self.encoder_opt = self.decoder_opt = None
        if self.decoder is not None:
            # The reconstruction step has its own Adam on the encoder (convs and the critic's
            # head), beside the critic's (authors' code), and an L2 penalty on the decoder (RAE).
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
        parts = dict(
            do_actor=step % self.args.actor_update_freq == 0,
            do_targets=step % self.args.target_update_freq == 0,
            do_ae=self.decoder is not None and step % self.args.ae_update_freq == 0,
        )
        if self.args.compile:
            update_step = compiled_step(self, parts)  # below the banner: same maths, faster
        else:
            update_step = functools.partial(self.update_step, **parts)
        with self.autocast():  # --precision bf16; parameters, losses and Adam stay float32
            metrics = update_step(*batch)
        # A reduced loss can be a 0-d view of the whole element-wise buffer (F.mse_loss on CPU:
        # 32 MB at batch 128): copy each value out, so that what callers keep is 4 bytes.
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
        """Soft Bellman backup on clipped double Q; the critic's gradient trains the encoder."""
        with torch.no_grad():
            next_action, next_log_pi = sample_action(*self.actor(self.encoder(next_obs)))
            target_q1, target_q2 = self.critic_target(self.encoder_target(next_obs), next_action)
            target_v = torch.min(target_q1, target_q2) - self.alpha * next_log_pi
            # not_done is the time step's discount: 0 only at a true terminal, so the time limit
            # that ends every DMC episode is bootstrapped through.
            target_q = reward + not_done * self.args.gamma * target_v
        # --ae-grad separate (Sec. 4.3): the critic reads a detached z, only reconstruction
        # shapes the encoder.
        q1, q2 = self.critic(self.encoder(obs), action, detach_z=self.args.ae_grad == "separate")
        # (.float(): under bf16 autocast, network outputs meet float32 targets in float32.)
        loss = F.mse_loss(q1.float(), target_q) + F.mse_loss(q2.float(), target_q)
        self.critic_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.critic_opt.step()
        return {"critic_loss": loss, "q": q1.mean()}

    def update_actor_and_alpha(self, h):
        """SAC's policy step on detached conv features, then the temperature step."""
        pi, log_pi = sample_action(*self.actor(h))
        q1, q2 = self.critic(h, pi)
        actor_loss = (self.alpha.detach() * log_pi - torch.min(q1, q2).float()).mean()
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
        """The target encoder (convs and the critic's head) follows faster, tau 0.05, than the
        target Q networks, tau 0.01 (authors' code)."""
        soft_update(self.encoder, self.encoder_target, self.args.encoder_tau)
        soft_update(self.critic.head, self.critic_target.head, self.args.encoder_tau)
        soft_update(self.critic.Q1, self.critic_target.Q1, self.args.critic_tau)
        soft_update(self.critic.Q2, self.critic_target.Q2, self.args.critic_tau)

    def update_autoencoder(self, pixels, h):
        """RAE (Sec. 5): reconstruct the 5-bit observation from the critic's latent z, with an L2
        penalty on z (the decoder's weight decay is in its Adam). --decoder vae: beta-VAE (Sec. 4)
        reconstructing a sample of the posterior, plus beta * KL."""
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

    def reconstruct(self, obs):
        recon = self.infer(obs, lambda h: self.decoder(self.critic.head(h)))
        return recon[0].float().cpu().numpy()

    def autocast(self):
        bf16, cache = self.args.precision == "bf16", not self.cuda_graphs  # a graph has no cache
        return torch.autocast(self.device.type, torch.bfloat16, enabled=bf16, cache_enabled=cache)

    # ------------------------------------------------------------------------ bookkeeping
    @property
    def cuda_graphs(self):
        """--compile on a GPU replays the update from CUDA graphs (CapturedStep, below)."""
        return self.args.compile and self.device.type == "cuda"

    def networks(self):
        nets = dict(encoder=self.encoder, actor=self.actor, critic=self.critic)
        nets.update(encoder_target=self.encoder_target, critic_target=self.critic_target)
        return {**nets, "decoder": self.decoder} if self.decoder is not None else nets

    def optimizers(self):
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def to(self, device):
        for net in self.networks().values():
            net.to(device, memory_format=torch.channels_last)  # conv kernels NHWC, as their inputs
        self.log_alpha = self.log_alpha.to(device).requires_grad_()
        return self

    def parameters(self):
        return [self.log_alpha, *(p for net in self.networks().values() for p in net.parameters())]

    def train(self, training=True):
        for net in self.networks().values():
            net.train(training)

    def state_dict(self):
        state = {k: m.state_dict() for k, m in {**self.networks(), **self.optimizers()}.items()}
        return {**state, "log_alpha": self.log_alpha.detach().clone()}

    def load_state_dict(self, state):
        for k, m in {**self.networks(), **self.optimizers()}.items():
            m.load_state_dict(state[k])
        for opt in self.optimizers().values():  # the checkpoint's run may have had other flags
            for group in opt.param_groups:
                group["capturable"] = self.cuda_graphs
        self.compiled = {}  # CUDA graphs hold the old optimizer state's addresses: capture anew
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])

    def load_encoder(self, weights):
        """Transfer (Fig. 7): the encoder and both latent heads from another run's weights; the
        target encoder and the target critic's head start as copies of them."""
        self.encoder.load_state_dict(weights["encoder"])
        for net, saved in ((self.critic, weights["critic"]), (self.actor, weights["actor"])):
            net.head.load_state_dict({k[5:]: v for k, v in saved.items() if k[:5] == "head."})
        self.encoder_target.load_state_dict(self.encoder.state_dict())
        self.critic_target.head.load_state_dict(self.critic.head.state_dict())


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
    """A dm_control task seen by the agent: action repeat -> observation -> frame stack (Sec. 4.1).

    Observations are uint8 (3 * frame_stack, size, size) renders, or float32 proprioceptive
    states. Actions live in [-1, 1]^A and are rescaled to the task's bounds. `step` returns
    (obs, reward, discount, done, env_steps): the time step's discount is 0 only at a true
    terminal, so the time limit that ends every DMC episode is bootstrapped through.
    """

    def __init__(
        self, domain, task, seed, obs="pixels", image_size=84, frame_stack=3, action_repeat=2
    ):
        self.env = load_suite().load(domain, task, task_kwargs={"random": seed})
        self.obs_type, self.image_size, self.action_repeat = obs, image_size, action_repeat
        self.camera_id = CAMERA_ID.get(domain, 0)
        visual, name = self.env.physics.model.vis.global_, f"{domain}-{task}"
        largest = min(visual.offwidth, visual.offheight)  # MuJoCo renders into a buffer this big
        if obs == "pixels" and image_size > largest:
            raise UsageError(
                f"--image-size {image_size} is larger than {name}'s offscreen buffer "
                f"({visual.offwidth}x{visual.offheight}); use at most {largest}"
            )
        spec = self.env.action_spec()
        self.action_dim = spec.shape[0]
        self._low, self._high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.frames = collections.deque(maxlen=frame_stack)
        self.frame_shape = (3, image_size, image_size) if obs == "pixels" else (self.state_dim,)
        self.obs_shape = (self.frame_shape[0] * frame_stack, *self.frame_shape[1:])
        limit = self.env._step_limit  # physics steps per episode
        if not math.isfinite(limit) or action_repeat > limit:
            raise UsageError(
                f"--action-repeat {action_repeat}: {name}'s episodes last {limit} "
                "steps; this script needs episodes that end and are longer"
            )
        self.episode_env_steps = round(limit)
        self.episode_length = math.ceil(limit / action_repeat)  # agent steps per episode

    def agent_steps(self, env_steps):
        """Agent steps that take env_steps environment steps (an episode's last may be short)."""
        episodes, rest = divmod(env_steps, self.episode_env_steps)
        return episodes * self.episode_length + math.ceil(rest / self.action_repeat)

    @property
    def state_dim(self):
        return sum(size for _, size in self.state_groups)

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
        action = self._low + (np.asarray(action, np.float64) + 1.0) * 0.5 * (self._high - self._low)
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
        """Everything needed to continue mid-episode: dm_control pickles physics (model and data, so
        warm starts and per-episode model edits too), task and its RandomState, and step counters.
        The model's textures make it 12 MB; they compress to about 0.7 MB."""
        return {"env": zlib.compress(pickle.dumps(self.env), 1), "frames": list(self.frames)}

    def load_state_dict(self, state):
        self.env = pickle.loads(zlib.decompress(state["env"]))
        self.frames.clear()
        self.frames.extend(state["frames"])


# ==================================================================================== replay buffer
class ReplayBuffer:
    """Each frame stored once; stacked observations are rebuilt when sampled.

    Slot t of a ring holds one frame: the first frame of an episode (age 0), or the newest frame
    of the observation a transition reached, with that transition's action, reward and not-done
    (age = agent steps since the episode began). The frame j steps before slot t is at slot
    t - min(j, age[t]), which repeats the first frame at the start of an episode exactly as the
    environment's stack does. A transition stays sampleable while all k+1 frames it needs are in
    the ring; the ring has room for `capacity` transitions plus their episodes' first frames.
    The ring lives on `storage` (the training GPU when it fits there): batches are gathered where
    it is, by index, and only the indices cross from the host.
    """

    def __init__(
        self,
        frame_shape,
        frame_dtype,
        frame_stack,
        action_dim,
        capacity,
        episode_length,
        seed=0,
        device="cpu",
        storage=None,
    ):
        self.k, self.frame_shape, self.capacity = frame_stack, tuple(frame_shape), capacity
        self.device = torch.device(device)
        self.storage = torch.device(storage or device)
        self.size = capacity + math.ceil(capacity / episode_length) + 1 + frame_stack  # slots
        frame_bytes = math.prod(frame_shape) * frame_dtype.itemsize
        self.nbytes = self.size * (frame_bytes + 4 * (action_dim + 3))
        self.frames = torch.empty((self.size, *frame_shape), dtype=frame_dtype, device=self.storage)
        self.scalars = torch.empty(
            (self.size, action_dim + 2), device=self.storage
        )  # a, r, not-done
        self.age = np.zeros(self.size, np.int32)  # on the host: sampling reads it there
        self.t = 0  # slots ever written; slot t lives at index t % size
        self.rng = np.random.default_rng(seed)

    @property
    def bytes_per_transition(self):
        return self.nbytes / self.capacity

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
        self._write(
            next_obs[-self.frame_shape[0] :], self.age[(self.t - 1) % self.size] + 1, scalars
        )

    def _valid(self, t):
        """Slots that are transitions whose every frame is still in the ring."""
        age = self.age[t % self.size]
        return (age > 0) & (t - np.minimum(age, self.k) >= self.t - self.size)

    def sample_slots(self, n):
        """n transition slots, uniformly with replacement over the valid ones (by rejection)."""
        valid = self._valid(np.arange(max(0, self.t - self.size), self.t)).any()
        if not self.t or not valid:
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
            frames, scalars = (
                x.pin_memory().to(self.device, non_blocking=True) for x in (frames, scalars)
            )
        frames = frames.view(b, self.k + 1, *self.frame_shape)  # (B, k+1, C, H, W)
        obs = frames[:, : self.k].reshape(b, -1, *self.frame_shape[1:])  # (B, k*C, H, W)
        next_obs = frames[:, 1:].reshape(b, -1, *self.frame_shape[1:])
        return obs, scalars[:, :-2], scalars[:, -2:-1], next_obs, scalars[:, -1:]

    def sample(self, n):
        return self.get(self.sample_slots(n))


# ======================================================================================= evaluation
def evaluate(env, agent, episodes, video_path=None, probe=False, stop=None):
    """Deterministic policy (tanh of the mean) on the evaluation environment.

    Returns the episode returns and, with probe=True, the critic's latent and the true state of
    every visited observation, and one observation from the first episode to reconstruct; None
    as soon as `stop` (the training loop's signal flag) is set.
    """
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
        import imageio

        imageio.mimsave(video_path, frames, fps=30)
    if probe:
        latents, states = np.stack(latents), np.stack(states)
    return returns, latents, states, sample


def linear_probe(latents, states, groups):
    """Fig. 6: least-squares map latent -> true state fitted on the first half of the frames, R^2 on
    the second half. R^2 is per state dimension, averaged over dimensions (those that vary), overall
    and per group of the task's observations (position, velocity, ...); NaN with fewer than 4
    frames per coefficient in the fitting half, or where no dimension varies."""
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
METRICS = [
    "critic_loss",
    "q",
    "actor_loss",
    "alpha_loss",
    "alpha",
    "entropy",
    "ae_loss",
    "recon_loss",
    "kl",
]
RETURNS = [f"episode_return_{k}" for k in ("mean", "std", "min", "max")]
EVAL_FIELDS = ["env_step", "agent_step", *RETURNS, "episodes", "wall_time"]
TRAIN_FIELDS = [
    "env_step",
    "agent_step",
    "episode",
    "episode_return",
    "episode_length",
    "updates",
    *METRICS,
    "fps",
    "wall_time",
]
TENSORBOARD_TAGS = {  # CleanRL's names, so its users find the curves where they expect them
    "charts/episodic_return": "episode_return",
    "charts/SPS": "fps",
    "losses/qf_loss": "critic_loss",
    "losses/actor_loss": "actor_loss",
    "losses/alpha": "alpha",
    "losses/alpha_loss": "alpha_loss",
    "losses/entropy": "entropy",
    "losses/ae_loss": "ae_loss",
    "losses/kl": "kl",
}


@dataclasses.dataclass
class State:
    """Where a run stands. With the networks, the replay buffer, both environments and the random
    generators, it is all that a checkpoint keeps; what is due next is a formula of it."""

    env_step: int = 0
    agent_step: int = 0
    updates: int = 0
    episode: int = 0
    episode_return: float = 0.0
    episode_env_steps: int = 0
    last_eval: int = -1  # env step of the last completed evaluation
    last_checkpoint: int = 0
    wall_time: float = 0.0  # seconds the run has taken, up to its last checkpoint
    action: np.ndarray = None  # this agent step's action, chosen before its updates

    def advance(self, reward, env_steps):
        self.agent_step, self.env_step = self.agent_step + 1, self.env_step + env_steps
        self.episode_return += reward
        self.episode_env_steps += env_steps
        self.action = None


def updates_due(agent_step, args):
    """Updates run once agent step t's are: none before --init-steps, a burst of --init-updates at
    it (authors' code), then one per agent step."""
    return 0 if agent_step < args.init_steps else args.init_updates + agent_step - args.init_steps


def train(args):
    """The training loop (the authors' train.py): act, update, step the environment, store."""
    with stop_on_signal() as stop, Run(args) as run, progress(run):
        s, agent, env, replay = run.state, run.agent, run.env, run.replay
        while s.env_step < args.total_steps and not stop:
            run.evaluate_if_due(stop)  # at env step 0 and every --eval-freq
            if stop:  # the evaluation was cut short: the checkpoint keeps it to redo
                break
            run.checkpoint_if_due()  # every --checkpoint-freq
            # Act: uniform random for the first --init-steps agent steps, then sample the policy.
            if s.action is None:
                explore = s.agent_step < args.init_steps
                s.action = run.random_action() if explore else agent.act(run.obs)
            # Update: all due by this agent step, a burst of --init-updates at --init-steps
            # (authors' code), then one per step. A signal stops them within one update.
            while s.updates < updates_due(s.agent_step, args) and not stop:
                metrics = agent.update(replay.sample(args.batch_size), s.agent_step)
                run.metrics.add(s.agent_step, metrics)
                s.updates += 1
            if stop:
                break
            # Step the environment with the action chosen before the updates; store the newest
            # frame, action, reward and not-done.
            run.obs, reward, not_done, done, env_steps = env.step(s.action)
            replay.add(s.action, reward, not_done, run.obs)
            s.advance(reward, env_steps)
            if done:
                run.log_episode()  # train.csv, TensorBoard; a NaN loss stops the run here
                run.obs = env.reset()
                replay.add_first(run.obs)
        return run.finish(stop)


class Run:
    """A run's parts: its environments, agent, replay buffer, logs and State. A new run writes
    config.json; --resume restores every part from the run folder's latest checkpoint."""

    def __init__(self, args):
        self.args, self.device = args, pick_device(args.device)
        seed_everything(args.seed)
        self.action_rng = np.random.default_rng(args.seed)  # the uniform actions of --init-steps
        kw = dict(
            obs=args.obs,
            image_size=args.image_size,
            frame_stack=args.frame_stack,
            action_repeat=args.action_repeat,
        )
        self.env = DMCEnv(args.domain, args.task, args.seed, **kw)
        self.eval_env = DMCEnv(args.domain, args.task, args.seed + EVAL_SEED_OFFSET, **kw)
        self.obs = self.env.reset()  # renders: a GL failure shows here, before the run folder
        if args.save_video:
            self.eval_env.render(8)  # a state run renders its videos only: the same check
        # --buffer-size, or fewer if the run has fewer agent steps (a resume that extends the run
        # grows the ring to what an uninterrupted run of that length would have had).
        capacity = min(args.buffer_size, self.env.agent_steps(args.total_steps))
        self.replay = replay_buffer(self.env, capacity, args.seed, self.device)
        self.agent = SACAE(self.env.obs_shape, self.env.action_dim, self.device, args)
        self.state, self.metrics = State(), EpisodeMetrics(self.device)
        self.held = contextlib.ExitStack()  # the logs and the folder's lock, closed at the end
        try:
            self.logs = open_run_folder(self)  # below the banner: new, or from a checkpoint
        except BaseException:
            self.held.close()
            raise
        self.start = time.time() - self.state.wall_time
        self.clock = (time.perf_counter(), self.state.env_step)  # for fps

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        with contextlib.suppress(OSError):  # a full disk fails the closing too: reported already
            self.held.close()
        if isinstance(error, NonFiniteError) and "action" in str(error):
            self.metrics.means()  # raises for the NaN or inf loss that came first, if one did

    def path(self, *parts):
        return os.path.join(self.args.out_dir, *parts)

    def random_action(self):
        return self.action_rng.uniform(-1.0, 1.0, self.env.action_dim).astype(np.float32)

    def evaluate_if_due(self, stop):
        """At env step 0, every --eval-freq and at the end: eval.csv, TensorBoard, the linear probe
        (Fig. 6) and a reconstruction. A signal cuts it short, to be redone on resume."""
        s, args, agent, tb = self.state, self.args, self.agent, self.logs["tb"]
        end = s.env_step >= args.total_steps and s.last_eval != s.env_step
        if s.env_step // args.eval_freq <= s.last_eval // args.eval_freq and not end:
            return
        began, before, pixels = (
            time.perf_counter(),
            self.eval_env.state_dict(),
            args.obs == "pixels",
        )
        video = self.path("video", f"eval_{s.env_step}.mp4") if args.save_video else None
        agent.train(False)
        result = evaluate(self.eval_env, agent, args.eval_episodes, video, pixels, stop)
        agent.train(True)
        if result is None:  # cut short by a signal: as if it had not begun
            self.eval_env.load_state_dict(before)
            return
        returns, latents, states, sample = result
        stats = [np.mean(returns), np.std(returns), np.min(returns), np.max(returns)]
        row = {
            "env_step": s.env_step,
            "agent_step": s.agent_step,
            "episodes": len(returns),
            **dict(zip(RETURNS, map(float, stats))),
            "wall_time": time.time() - self.start,
        }
        if pixels:
            row.update(linear_probe(latents, states, self.eval_env.state_groups))
            tb.add_scalar("eval/probe_r2", row["probe_r2"], s.env_step)
        if agent.decoder is not None and sample is not None:
            picture = reconstruction_image(sample, agent.reconstruct(sample))
            write_png(self.path("recon", f"eval_{s.env_step}.png"), picture)
            tb.add_image("eval/reconstruction", picture, s.env_step, dataformats="HWC")
        self.logs["eval.csv"].write(row)
        tb.add_scalar("eval/return", row["episode_return_mean"], s.env_step)
        tb.flush()
        s.last_eval = s.env_step
        steps = args.eval_episodes * self.eval_env.episode_env_steps
        probe = f" | probe R^2 {row['probe_r2']:.2f}" if pixels else ""
        say(
            f"[eval] env_step {s.env_step} (agent {s.agent_step}) | return {stats[0]:.1f} +- "
            f"{stats[1]:.1f} over {len(returns)} episodes{probe} | "
            f"fps {steps / (time.perf_counter() - began):.0f}"
        )

    def checkpoint_if_due(self):
        if self.state.env_step // self.args.checkpoint_freq > (
            self.state.last_checkpoint // self.args.checkpoint_freq
        ):
            self.checkpoint()

    def checkpoint(self):
        self.state.last_checkpoint = self.state.env_step
        self.state.wall_time = time.time() - self.start
        return save_checkpoint(self)  # below the banner

    def log_episode(self):
        """The episode's row: its return and length, and the mean of each metric over its updates
        (which raises, naming it, if one is NaN or inf)."""
        s, (began, from_step), now = self.state, self.clock, time.perf_counter()
        fps = (s.env_step - from_step) / (now - began)  # this process's steps, evaluations too
        row = {
            "env_step": s.env_step,
            "agent_step": s.agent_step,
            "episode": s.episode,
            "episode_return": s.episode_return,
            "episode_length": s.episode_env_steps,
            "updates": s.updates,
            **self.metrics.means(),
            "fps": fps,
            "wall_time": time.time() - self.start,
        }
        self.logs["train.csv"].write(row)
        for tag, key in TENSORBOARD_TAGS.items():
            if key in row:
                self.logs["tb"].add_scalar(tag, row[key], s.env_step)
        say(
            f"[train] env_step {s.env_step} (agent {s.agent_step}) | episode {s.episode} | "
            f"return {s.episode_return:.1f} | fps {fps:.1f}"
        )
        s.episode, s.episode_return, s.episode_env_steps = s.episode + 1, 0.0, 0
        self.metrics.clear()
        self.clock = (now, s.env_step)

    def finish(self, stop):
        """With a signal: a checkpoint, and how to resume. Else the final evaluation, a checkpoint,
        the row of an episode that --total-steps cut (after the checkpoint: a resume that extends
        the run truncates it and logs that episode whole), and model.pt."""
        if not stop:
            self.evaluate_if_due(stop)
        path = self.checkpoint()
        if stop:
            say(
                f"[stopped] {stop.name}: checkpoint {path}; resume with: python {sys.argv[0]} "
                f"--resume {self.args.out_dir}"
            )
            return 128 + stop.signum
        if self.state.episode_env_steps:
            self.log_episode()
        export_model(self)
        say(
            f"[done] {self.state.env_step} environment steps in "
            f"{time.time() - self.start:.0f} s; weights in {self.path('model.pt')}"
        )
        return 0


class EpisodeMetrics:
    """The update metrics of one training episode, kept on the device until its one host sync.

    Each update writes one row of a preallocated table: keeping each update's metrics as tensors
    of their own, a few bytes each, pinned the allocator's heap between the batch's large
    buffers, and resident memory grew with every update.
    """

    def __init__(self, device):
        self.table = torch.zeros(64, len(METRICS), device=device)
        self.steps, self.present, self.columns = [], [], {}

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
        """Each metric's mean over the episode's updates. Raises NonFiniteError naming the first
        NaN or inf loss and the agent step it appeared at."""
        values, means = self.table[: len(self.steps)].cpu(), {}
        for j, name in enumerate(METRICS):
            rows = [i for i, names in enumerate(self.present) if name in names]
            if not rows:
                continue
            column = values[rows, j]
            bad = (~torch.isfinite(column)).nonzero()
            if len(bad):
                i = int(bad[0])
                step = self.steps[rows[i]]
                raise NonFiniteError(f"{name} became {column[i].item()} at agent step {step}")
            means[name] = column.mean().item()
        return means

    def clear(self):
        self.steps, self.present = [], []

    def state_dict(self):
        values = self.table[: len(self.steps)].cpu()
        return {"steps": self.steps, "present": self.present, "values": values}

    def load_state_dict(self, state):
        self.clear()
        values = state["values"].to(self.table.device)  # a checkpoint's rows are on the CPU
        for step, names, row in zip(state["steps"], state["present"], values):
            self.add(step, {n: row[METRICS.index(n)] for n in names})


class CSVLog:
    """Append rows to a CSV file, writing the header once and flushing every row."""

    def __init__(self, path, fields):
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        if self.file.tell() == 0:
            self.writer.writeheader()

    def write(self, row):
        self.writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        self.file.flush()


def pick_device(name):
    """torch.device for --device, and the GPU numerics: true float32 (TF32 off, as the authors'
    pre-Ampere GPUs computed; --precision bf16 is the fast mode) and cuDNN's autotuner, which picks
    the fastest kernels for the fixed shapes (so GPU runs are not bit-identical, see README)."""
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
# SAC+AE ends here: all of it, the training loop included, is above. Below: the run-keeping that
# wraps the loop (run folder, checkpoints and resume, signals, progress), the flags and their
# checks, --compile's CUDA graphs, --benchmark, --plot, and main(), the one error boundary.
# ##################################################################################################
class UsageError(ValueError):
    """A user mistake: reported as one line and exit status 2."""


class RenderError(RuntimeError):
    def __init__(self, cause):
        super().__init__(
            f"rendering with MUJOCO_GL={os.environ.get('MUJOCO_GL')} failed ({cause}); try "
            "MUJOCO_GL=egl (GPU or Mesa EGL), MUJOCO_GL=osmesa (apt-get install libosmesa6) or "
            "MUJOCO_GL=glfw (needs a display); --obs state runs without rendering under "
            "MUJOCO_GL=disable"
        )


class NonFiniteError(RuntimeError):
    """A loss, action or parameter became NaN or inf."""


class Interrupted(BaseException):
    """A second SIGINT or SIGTERM: stop at once. Not an Exception (as KeyboardInterrupt is not),
    so that no handler of faults mistakes it for one."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ====================================================================== signals, console, progress
class Stop:
    """Set by the first SIGINT or SIGTERM; the training loop reads it."""

    signum = None
    name = property(lambda self: signal.Signals(self.signum).name)

    def __bool__(self):
        return self.signum is not None


@contextlib.contextmanager
def stop_on_signal():
    """The first signal asks the loop to finish its update or step and write a checkpoint; a
    second stops at once (Interrupted)."""
    stop = Stop()

    def handler(signum, frame):
        if stop:
            raise Interrupted(signum)
        stop.signum = signum

    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def say(line):
    """A console line, above the progress bar. If the console has gone (a closed pipe: `| head`),
    the run goes on, writing its run folder, and the console is written to /dev/null."""
    try:
        tqdm.tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):  # ValueError: sys.stdout was closed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


@contextlib.contextmanager
def progress(run, every=0.5, log_every=60.0):
    """The progress line, redrawn from the run's State by a thread of its own, so the loop never
    calls it: on a terminal a tqdm bar over environment steps (rate, ETA, updates, the burst); in
    a log, a [burst] line every minute while the burst runs."""
    s, args, stopped = run.state, run.args, threading.Event()
    bar = tqdm.tqdm(
        total=args.total_steps,
        initial=s.env_step,
        unit="env step",
        leave=False,
        disable=not sys.stdout.isatty(),
        dynamic_ncols=True,
    )
    logged = time.monotonic()

    def draw():
        nonlocal logged
        while not stopped.wait(every):
            left = updates_due(s.agent_step, args) - s.updates
            burst = f" (burst: {left:,} to go)" if left > 1 else ""
            bar.set_postfix_str(f"{s.updates:,} updates{burst}", refresh=False)
            bar.update(s.env_step - bar.n)
            if bar.disable and burst and time.monotonic() - logged > log_every:
                say(f"[burst] {s.updates:,} updates done, {left:,} to go")
                logged = time.monotonic()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield bar
    finally:
        stopped.set()
        thread.join()
        bar.close()


# ========================================================================= the run folder, resume
def replay_buffer(env, capacity, seed, device):
    """The run's replay buffer: in GPU memory when it fits there with 2 GiB to spare for the
    networks, else in host memory (said so); refused in one line when it fits in neither."""
    dtype = torch.uint8 if env.obs_type == "pixels" else torch.float32
    args = (
        env.frame_shape,
        dtype,
        env.frames.maxlen,
        env.action_dim,
        capacity,
        env.episode_length,
        seed,
        device,
    )
    need, storage = ReplayBuffer(*args, storage="meta").nbytes, device  # sized, not allocated
    if device.type == "cuda" and need + 2**31 > torch.cuda.mem_get_info(device)[0]:
        free = torch.cuda.mem_get_info(device)[0] / 2**30
        say(
            f"[replay] its {need / 2**30:.1f} GiB do not fit in the GPU's {free:.1f} GiB free: "
            "it stays in host memory, and each batch is copied over"
        )
        storage = torch.device("cpu")
    free = available_memory()
    if storage.type == "cpu" and free is not None and need > free:
        raise UsageError(
            f"the replay buffer needs {need / 2**30:.1f} GiB for {capacity:,} "
            f"transitions but only {free / 2**30:.1f} GiB is free; lower "
            "--buffer-size (or --total-steps with --resume)"
        )
    return ReplayBuffer(*args, storage=storage)


def available_memory():
    """Bytes the kernel says a new allocation can have (Linux), else None."""
    with contextlib.suppress(OSError, KeyError, ValueError), open("/proc/meminfo") as f:
        return int(dict(line.split(":", 1) for line in f)["MemAvailable"].split()[0]) * 1024


def open_run_folder(run):
    """A new run: the folder, config.json, and the first frame in the replay buffer. --resume:
    every part restored from the latest checkpoint, the logs cut back to it. Then the logs."""
    args = run.args
    if args.resume:
        lock_folder(run)
        path = load_checkpoint(run)
        s, run.obs = run.state, run.env.observation()
        left = updates_due(s.agent_step, args) - s.updates
        burst = f", {left:,} updates of the burst to go" if left > 1 else ""
        say(
            f"[resume] {args.out_dir} from {os.path.basename(path)}: env step {s.env_step}, "
            f"agent step {s.agent_step}, {s.updates:,} updates{burst}"
        )
    else:
        if args.load_encoder:
            load_encoder(run.agent, args.load_encoder)
        os.makedirs(args.out_dir, exist_ok=True)
        lock_folder(run)
        if os.listdir(args.out_dir):  # another run began writing it since the flags were checked
            raise UsageError(f"--out-dir {args.out_dir} is no longer empty; give a new folder")
        run.replay.add_first(run.obs)
    # Every resolved flag, and facts of this process (a resume writes them anew).
    facts = dict(device_resolved=str(run.device), versions=versions())
    facts.update(episode_length_agent_steps=run.env.episode_length, replay_capacity=run.replay.capacity)
    write_json(run.path("config.json"), {**vars(args), **facts})
    for folder, wanted in (("video", args.save_video), ("recon", run.agent.decoder is not None)):
        if wanted:
            os.makedirs(run.path(folder), exist_ok=True)
    groups = run.eval_env.state_groups
    probe = ["probe_r2", *(f"probe_r2_{g}" for g, _ in groups)] if args.obs == "pixels" else []
    logs = {
        "eval.csv": CSVLog(run.path("eval.csv"), EVAL_FIELDS + probe),
        "train.csv": CSVLog(run.path("train.csv"), TRAIN_FIELDS),
    }
    for log in logs.values():
        run.held.callback(log.file.close)
    from torch.utils.tensorboard import SummaryWriter

    # On resume, purge_step drops events logged after the checkpoint, as the CSVs are cut.
    logs["tb"] = SummaryWriter(run.path("tb"), purge_step=run.state.env_step + 1 if args.resume else None)
    run.held.callback(logs["tb"].close)
    unlisted = "" if args.domain in ACTION_REPEAT else " (default for unlisted domains)"
    burst = f"{args.init_updates:,} updates at agent step {args.init_steps:,}, then one per step"
    say(
        f"[setup] {args.domain}-{args.task} seed {args.seed} | obs {args.obs} decoder "
        f"{args.decoder} | action repeat {args.action_repeat}{unlisted} | device {run.device} | "
        f"replay {run.replay.capacity:,} transitions, {run.replay.nbytes / 2**30:.2f} GiB on "
        f"{run.replay.storage} ({run.replay.bytes_per_transition:,.0f} B each) | {burst} | "
        f"{args.out_dir}"
    )
    return logs


def lock_folder(run):
    """An exclusive lock (flock) on the run folder while this process writes it: a second run or
    resume of the same folder is refused instead of interleaving their files."""
    import fcntl

    fd = os.open(run.args.out_dir, os.O_RDONLY)
    run.held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(
            f"{run.args.out_dir} is being written by another sac_ae.py process; "
            "wait for it to end or stop it"
        ) from None
    except OSError as e:  # NFS, Lustre, some FUSE: no flock on a folder
        say(
            f"[lock] cannot lock {run.args.out_dir} ({e.strerror}): nothing stops a second "
            "process from writing into it"
        )


def write_json(path, data):
    with atomic_write(path) as f:
        f.write(json.dumps(data, indent=2).encode())


def write_png(path, picture):
    import imageio.v3 as iio

    with atomic_write(path) as f:
        f.write(iio.imwrite("<bytes>", picture, extension=".png"))


@contextlib.contextmanager
def atomic_write(path):
    """Write path.tmp, fsync, rename: a crash at any moment leaves the old file or the new one."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)  # make the rename itself durable
    finally:
        os.close(fd)


def zip_damage(path):
    """What is wrong with a zip file that torch.save or np.savez wrote, or None when every member's
    CRC-32 checks out (torch.load reads tensor data without checking them)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        return f"not a complete zip file: {e}"
    return f"CRC mismatch in {bad}" if bad else None


def versions():
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
    return {**out, **{pkg: md.version(pkg) for pkg in ("dm_control", "mujoco")}}


CHECKPOINT_FORMAT = 3  # 3: the loop's State as a dataclass, replay frames and scalars as tensors


def checkpoints(run_dir):
    """[(env_step, replay_slots, path)] of the complete checkpoints of a run, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    found = [re.fullmatch(r"ckpt_(\d+)_(\d+)\.pt", name) for name in names]
    return sorted((int(m[1]), int(m[2]), os.path.join(folder, m[0])) for m in found if m)


def latest_checkpoint(run_dir):
    found = checkpoints(run_dir) if run_dir and os.path.isdir(run_dir) else []
    return found[-1][2] if found else None


def replay_chunks(folder):
    """(start, end, path) of the replay chunk files in folder, in order: each holds the replay
    slots [start, end), written once, by the checkpoint made when slot end - 1 was the newest."""
    found = [re.fullmatch(r"replay_(\d+)_(\d+)\.npz", name) for name in os.listdir(folder)]
    return sorted((int(m[1]), int(m[2]), os.path.join(folder, m[0])) for m in found if m)


def replay_gap(folder, slots, size):
    """The first range of slots that a checkpoint at `slots` needs (the ring's last `size`) and no
    intact chunk holds, as "a..b", or None."""
    need = max(0, slots - size)
    for start, end, path in replay_chunks(folder):
        if end <= need or start >= slots:
            continue
        if start > need or zip_damage(path):
            return f"{need}..{min(end, slots) if start <= need else start}"
        need = end
    return f"{need}..{slots}" if need < slots else None


def save_checkpoint(run):
    """The replay slots added since the last checkpoint as a chunk of their own, then one file with
    everything else, each atomically; then older checkpoints beyond --keep-checkpoints, and the
    chunks that no kept checkpoint needs, are removed."""
    s, args, replay = run.state, run.args, run.replay
    run.metrics.means()  # raises on a NaN or inf loss: never write a poisoned checkpoint
    finite = torch.stack([torch.isfinite(p).all() for p in run.agent.parameters()])
    if not bool(finite.all()):
        raise NonFiniteError(f"a parameter became NaN or inf by agent step {s.agent_step}")
    for name in ("eval.csv", "train.csv"):  # the rows the checkpoint counts, on disk before it
        os.fsync(run.logs[name].file.fileno())
    run.logs["tb"].flush()
    folder = run.path("checkpoints")
    os.makedirs(folder, exist_ok=True)
    start = max(
        max((end for _, end, _ in replay_chunks(folder)), default=0), replay.t - replay.size
    )
    if start < replay.t:
        index = torch.from_numpy(np.arange(start, replay.t) % replay.size)
        with atomic_write(os.path.join(folder, f"replay_{start:012d}_{replay.t:012d}.npz")) as f:
            np.savez(
                f,
                frames=replay.frames[index.to(replay.storage)].cpu().numpy(),
                scalars=replay.scalars[index.to(replay.storage)].cpu().numpy(),
                age=replay.age[index.numpy()],
            )
    rng = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "actions": run.action_rng.bit_generator.state,
        "replay": replay.rng.bit_generator.state,
    }
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "args": vars(args),
        "state": dataclasses.asdict(s),
        "metrics": run.metrics.state_dict(),
        "agent": run.agent.state_dict(),
        "rng": rng,
        "env": run.env.state_dict(),
        "eval_env": run.eval_env.state_dict(),
        "csv_bytes": {k: run.logs[k].file.tell() for k in ("eval.csv", "train.csv")},
    }
    path = os.path.join(folder, f"ckpt_{s.env_step:010d}_{replay.t:012d}.pt")
    with atomic_write(path) as f:
        torch.save(payload, f)
    kept = checkpoints(args.out_dir)
    for _, _, old in kept[: -(args.keep_checkpoints + 1)]:
        os.remove(old)
    oldest = kept[-(args.keep_checkpoints + 1) :][0][1]
    for _, end, chunk in replay_chunks(folder):
        if end <= oldest - replay.size:  # overwritten in the ring of every kept checkpoint
            os.remove(chunk)
    return path


def load_checkpoint(run):
    """Restore what save_checkpoint wrote. A damaged or foreign checkpoint is refused in one line
    (UsageError) before anything in the run folder changes."""
    args, replay, folder = run.args, run.replay, run.path("checkpoints")
    found = checkpoints(args.out_dir)
    _, slots, path = found[-1]
    older = [p for _, t, p in found[:-1] if not zip_damage(p)]
    if older:
        remedy = f"move it aside to resume from the one before, {os.path.basename(older[-1])}"
    else:
        remedy = "there is no intact older checkpoint: start the run again"
    try:
        damage = zip_damage(path)
        if damage:
            raise ValueError(damage)
        payload = torch.load(path, map_location="cpu", weights_only=False)  # ours: numpy inside
        state = State(**payload["state"])
    except Exception as e:
        why = " ".join(str(e).split()) or type(e).__name__
        raise UsageError(f"checkpoint {path} is damaged or truncated ({why}); {remedy}") from None
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(
            f"checkpoint {path} was written by another version of sac_ae.py (format "
            f"{payload.get('format')}, this one reads {CHECKPOINT_FORMAT})"
        )
    theirs, mine = maths_config(argparse.Namespace(**payload["args"])), maths_config(args)
    for k in sorted(theirs.keys() & mine.keys()):
        if theirs[k] != mine[k]:
            raise UsageError(
                f"--resume {args.out_dir}: config.json says {k} {mine[k]!r} but "
                f"checkpoint {os.path.basename(path)} was trained with {theirs[k]!r}; "
                "put config.json back as the run wrote it"
            )
    for name, size in payload["csv_bytes"].items():
        if not os.path.isfile(run.path(name)) or os.path.getsize(run.path(name)) < size:
            raise UsageError(
                f"{run.path(name)} is shorter than checkpoint {path} recorded; the "
                "run folder is damaged"
            )
    gap = replay_gap(folder, slots, replay.size)
    if gap:
        usable = [p for _, t, p in found[:-1] if not replay_gap(folder, t, replay.size)]
        remedy = (
            f"move it aside to resume from {os.path.basename(usable[-1])}"
            if usable
            else "no older checkpoint has its replay either: the run cannot be resumed from "
            "these files; start it again"
        )
        raise UsageError(
            f"checkpoint {path} needs replay slots {gap}, which no intact chunk in "
            f"{folder} holds; {remedy}"
        )
    # Accepted: from here on the run is rewound to the checkpoint, its folder too.
    run.agent.load_state_dict(payload["agent"])
    replay.t, need = slots, max(0, slots - replay.size)
    for start, end, chunk_path in replay_chunks(folder):
        lo, hi = max(start, need), min(end, slots)
        if lo < hi:
            with np.load(chunk_path) as chunk:
                i, part = (
                    torch.from_numpy(np.arange(lo, hi) % replay.size),
                    slice(lo - start, hi - start),
                )
                replay.frames[i.to(replay.storage)] = torch.from_numpy(chunk["frames"][part]).to(
                    replay.storage
                )
                replay.scalars[i.to(replay.storage)] = torch.from_numpy(chunk["scalars"][part]).to(
                    replay.storage
                )
                replay.age[i.numpy()] = chunk["age"][part]
        elif start >= slots:  # written after this checkpoint by the run that stopped
            os.remove(chunk_path)
    replay.has_transition = bool((replay.age[np.arange(need, slots) % replay.size] > 0).any())
    run.env.load_state_dict(payload["env"])
    run.eval_env.load_state_dict(payload["eval_env"])
    rng = payload["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    run.action_rng.bit_generator.state = rng["actions"]
    replay.rng.bit_generator.state = rng["replay"]
    if "cuda" in rng and run.device.type == "cuda":  # a run moved from CPU starts CUDA's afresh
        torch.cuda.set_rng_state(rng["cuda"], run.device)
    for name, size in payload["csv_bytes"].items():  # drop rows written after the checkpoint
        with open(run.path(name), "r+b") as f:
            f.truncate(size)
    run.state = state
    run.metrics.load_state_dict(payload["metrics"])
    return path


def export_model(run):
    """RUN_DIR/model.pt: the trained networks alone, for torch.load(..., weights_only=True)."""
    weights = {
        name: {k: t.cpu() for k, t in net.state_dict().items()}  # readable without a GPU
        for name, net in run.agent.networks().items()
    }
    weights["log_alpha"] = run.agent.log_alpha.detach().cpu()
    with atomic_write(run.path("model.pt")) as f:
        torch.save({**weights, "config": maths_config(run.args)}, f)


def load_encoder(agent, path):
    """--load-encoder: the encoder and both latent heads of a run folder's model.pt, a model.pt or
    a checkpoint file (transfer, Fig. 7)."""
    file = os.path.join(path, "model.pt") if os.path.isdir(path) else path
    try:
        damage = zip_damage(file)
        if damage:
            raise ValueError(damage)
        saved = torch.load(file, map_location="cpu", weights_only=False)
        config = saved.get("config") or maths_config(argparse.Namespace(**saved["args"]))
        weights = saved.get("agent", saved)  # a checkpoint, or model.pt
        weights["encoder"], weights["critic"], weights["actor"]
    except Exception as e:
        raise UsageError(
            f"--load-encoder {path}: no encoder weights of this version of sac_ae.py "
            f"in {file} ({' '.join(str(e).split())})"
        ) from None
    if config.get("obs") == "state":
        raise UsageError(f"--load-encoder {path}: a SAC:state run has no encoder to give")
    try:
        agent.load_encoder(weights)
    except RuntimeError as e:
        raise UsageError(
            f"--load-encoder {path}: its encoder does not fit this one (image size, "
            f"filters, layers or feature dim differ: {' '.join(str(e).split())})"
        )


# ====================================================================== flags: the manual is --help
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # defaults that are resolved later say so in their help
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line through main()'s error boundary, not a usage dump
        raise UsageError(message)


def checked(convert, valid, what):
    """An argparse type: convert the text; refuse what is not `valid`, saying `what` it must be."""

    def parse(text):
        with contextlib.suppress(ValueError):
            value = convert(text)
            if valid(value):
                return value
        raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'")

    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
seed_int = checked(
    int,
    lambda v: 0 <= v < 2**32 - EVAL_SEED_OFFSET,  # numpy's, less the offset
    f"an integer in [0, {2**32 - EVAL_SEED_OFFSET - 1}]",
)
bits_int = checked(int, lambda v: 1 <= v <= 8, "an integer in [1, 8]")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
unit_float = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
beta_float = checked(float, lambda v: 0 <= v < 1, "a number in [0, 1), as Adam needs")
finite_float = checked(float, math.isfinite, "a finite number")
device_name = checked(
    str, lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu, cuda or cuda:N"
)
RESUMABLE = "run: what may change on --resume"
MODES = "run folder and modes"


def build_parser():
    # fmt: off
    p = Parser(prog="sac_ae.py", formatter_class=HelpFormatter, description=__doc__.split("\n\n")[0]
               + " Every hyperparameter defaults to the paper's and the authors' code; budgets "
               "count environment steps (agent steps x action repeat), as the paper's plots do.")
    g = p.add_argument_group("task")
    g.add_argument("--domain", default="cheetah", help="dm_control suite domain")
    g.add_argument("--task", default="run", help="task of that domain")
    g.add_argument("--seed", type=seed_int, default=1,
                   help="seeds python, numpy, torch and both environments")
    g.add_argument("--obs", default="pixels", choices=["pixels", "state"],
                   help="pixels: SAC+AE from images; state: SAC on proprioceptive states, no "
                   "encoder or decoder (the paper's upper baseline, SAC:state)")
    g.add_argument("--decoder", default=None, choices=["pixel", "vae", "none"],
                   help="pixel: deterministic regularized autoencoder (SAC+AE); vae: beta-VAE "
                   "with a stochastic encoder head (Sec. 4); none: no reconstruction (SAC:pixel, "
                   "the lower baseline) [default: pixel with --obs pixels]")
    g = p.add_argument_group(RESUMABLE)
    g.add_argument("--total-steps", type=positive_int, default=500_000,
                   help="environment steps of training")
    g.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N; auto picks cuda when available. EGL renders "
                   "on the GPU that MUJOCO_EGL_DEVICE_ID names (EGL's own numbering)")
    g.add_argument("--checkpoint-freq", type=positive_int, default=None,
                   help="environment steps between checkpoints [default: --eval-freq]")
    g.add_argument("--keep-checkpoints", type=nonnegative_int, default=1,
                   help="older checkpoints kept besides the latest")
    g.add_argument("--save-video", action="store_true",
                   help="mp4 of the first episode of each evaluation in RUN_DIR/video")
    g = p.add_argument_group(MODES)
    g.add_argument("--out-dir", default=None,
                   help="run folder, must be new or empty [default: "
                   "runs/{domain}-{task}-s{seed}-{timestamp}]")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue that run from its latest checkpoint with its saved "
                   f"configuration; only the flags under '{RESUMABLE}' may be given with it")
    g.add_argument("--benchmark", action="store_true",
                   help="no training: time updates on a replay buffer of random frames and "
                   "environment steps, print a table and a final `benchmark ...` line")
    g.add_argument("--bench-updates", type=positive_int, default=20,
                   help="updates timed by --benchmark after warm-up (even: actor and targets keep "
                   "their rate)")
    g.add_argument("--plot", nargs="+", default=None, metavar="EVAL_CSV",
                   help="no training: draw each eval.csv as learning_curve.png beside it (needs "
                   "matplotlib)")
    g = p.add_argument_group("environment")
    g.add_argument("--action-repeat", type=positive_int, default=None,
                   help="times each action is applied [default: per domain, PlaNet's: "
                   + ", ".join(f"{k} {v}" for k, v in ACTION_REPEAT.items())
                   + f"; else {DEFAULT_REPEAT}]")
    g.add_argument("--frame-stack", type=positive_int, default=None,
                   help="consecutive observations stacked [default: 3 for pixels, 1 for states]")
    g.add_argument("--image-size", type=positive_int, default=84,
                   help="rendered frames are square, this many pixels")
    g = p.add_argument_group("replay and schedule")
    g.add_argument("--buffer-size", type=positive_int, default=1_000_000,
                   help="replay capacity in transitions (capped at the run's agent steps)")
    g.add_argument("--init-steps", type=positive_int, default=1000,
                   help="agent steps of uniform random actions before the first update")
    g.add_argument("--init-updates", type=positive_int, default=None,
                   help="updates run at once when --init-steps is reached, then one per agent "
                   "step [default: --init-steps, as the authors' code]")
    g.add_argument("--batch-size", type=positive_int, default=128, help="transitions per update")
    g.add_argument("--eval-freq", type=positive_int, default=10_000,
                   help="environment steps between evaluations")
    g.add_argument("--eval-episodes", type=positive_int, default=10, help="episodes per evaluation")
    g = p.add_argument_group("speed")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32: float32 throughout (TF32 off on GPUs); bf16: autocast the conv and "
                   "MLP work to bfloat16 (fast on CPUs with bf16 units, slow elsewhere); "
                   "parameters, losses and optimizer state stay float32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the whole update (each variant compiled at first use, "
                   "tens of seconds on CPU) and on a GPU replay it from CUDA graphs; same maths")
    g = p.add_argument_group("SAC")
    g.add_argument("--gamma", type=unit_float, default=0.99, help="discount")
    g.add_argument("--critic-lr", type=positive_float, default=1e-3,
                   help="Adam lr of the critic (and its encoder)")
    g.add_argument("--critic-beta", type=beta_float, default=0.9, help="Adam beta1 of the critic")
    g.add_argument("--critic-tau", type=unit_float, default=0.01,
                   help="soft target update rate of the Q heads")
    g.add_argument("--encoder-tau", type=unit_float, default=0.05,
                   help="soft target update rate of the target encoder")
    g.add_argument("--target-update-freq", type=positive_int, default=2,
                   help="soft target update on agent steps divisible by N (the initial burst "
                   "shares one step)")
    g.add_argument("--actor-lr", type=positive_float, default=1e-3, help="Adam lr of the actor")
    g.add_argument("--actor-beta", type=beta_float, default=0.9, help="Adam beta1 of the actor")
    g.add_argument("--actor-update-freq", type=positive_int, default=2,
                   help="actor and temperature step on agent steps divisible by N (the burst "
                   "shares one step)")
    g.add_argument("--actor-log-std-min", type=finite_float, default=-10.0,
                   help="lower bound of the policy's log std")
    g.add_argument("--actor-log-std-max", type=finite_float, default=2.0,
                   help="upper bound of the policy's log std")
    g.add_argument("--init-temperature", type=positive_float, default=0.1, help="initial alpha")
    g.add_argument("--alpha-lr", type=positive_float, default=1e-4, help="Adam lr of log alpha")
    g.add_argument("--alpha-beta", type=beta_float, default=0.5, help="Adam beta1 of log alpha")
    g.add_argument("--hidden-dim", type=positive_int, default=1024,
                   help="width of the actor and Q MLPs")
    g = p.add_argument_group("encoder and autoencoder")
    g.add_argument("--feature-dim", type=positive_int, default=50, help="latent size z")
    g.add_argument("--num-filters", type=positive_int, default=32,
                   help="channels of every conv layer")
    g.add_argument("--num-conv-layers", type=positive_int, default=4,
                   help="conv layers of the encoder (and decoder)")
    g.add_argument("--encoder-lr", type=positive_float, default=1e-3,
                   help="Adam lr of the encoder's reconstruction step")
    g.add_argument("--decoder-lr", type=positive_float, default=1e-3, help="Adam lr of the decoder")
    g.add_argument("--decoder-weight-decay", type=nonnegative_float, default=1e-7,
                   help="L2 penalty on decoder weights (RAE)")
    g.add_argument("--decoder-latent-lambda", type=nonnegative_float, default=1e-6,
                   help="weight of the latent penalty 0.5||z||^2 (RAE)")
    g.add_argument("--ae-update-freq", type=positive_int, default=1,
                   help="autoencoder step on agent steps divisible by N (the initial burst shares "
                   "one step)")
    g.add_argument("--ae-bits", type=bits_int, default=5,
                   help="bit depth of the reconstruction target, 1 to 8")
    g.add_argument("--ae-grad", default="end-to-end", choices=["end-to-end", "separate"],
                   help="end-to-end: the critic's gradient also trains the encoder (SAC+AE, Sec. "
                   "4.4/5); separate: only the reconstruction loss does, RL heads read a detached "
                   "latent (Sec. 4.3)")
    g.add_argument("--vae-beta", type=nonnegative_float, default=1e-6,
                   help="weight of the KL term with --decoder vae (Sec. 4.3: beta in [1e-8, 1e-6] "
                   "worked best)")
    g.add_argument("--load-encoder", default=None, metavar="PATH",
                   help="initialise the encoder and both latent heads from a run folder (its "
                   "model.pt) or a model.pt / checkpoint file (transfer, Fig. 7)")
    g.add_argument("--freeze-encoder", action="store_true",
                   help="with --load-encoder: keep the loaded encoder and both latent heads fixed "
                   "(the paper's Fig. 7 lets the critic train them)")
    return p
    # fmt: on


@functools.cache
def group(title):
    """The flags (dests) under one heading of --help: the groups say what may change on resume."""
    parser = build_parser()
    return {a.dest for g in parser._action_groups if g.title == title for a in g._group_actions}


def maths_config(args):
    """The flags a run's checkpoints must agree on: all but how long, where, and the modes."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in group(RESUMABLE) | group(MODES)}


def resumable(args):
    return {k: getattr(args, k) for k in group(RESUMABLE)}


def parse_args(argv=None):
    """Parse and check everything that can be checked before building anything (UsageError)."""
    parser, typer = build_parser(), build_parser()
    args = parser.parse_args(argv)
    typer.set_defaults(**dict.fromkeys(vars(args)))  # so only what argv gives is not None
    typed = {k: v for k, v in vars(typer.parse_args(argv)).items() if v is not None}
    if args.plot:
        for path in args.plot:
            read_eval_csv(path)  # refuse a missing, empty or foreign file before drawing any
        refuse(typed, dict.fromkeys(set(vars(args)) - {"plot"}, "--plot only draws eval.csv files"))
        return args
    if args.resume is not None:
        return resume_args(parser, args.resume, typed)
    check_device(args.device)
    resolve_args(args)
    refuse(typed, ignored_flags(args))
    return args


def refuse(typed, why):
    """UsageError if a flag of `why` ({dest: reason}) was given a value other than its default:
    it would be ignored without a word."""
    defaults = vars(build_parser().parse_args([]))
    given = sorted(k for k, v in typed.items() if k in why and v != defaults[k])
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')} has no effect: {why[given[0]]}")


def ignored_flags(args):
    """{dest: why} of the flags that this configuration never reads (later rows win)."""
    table = [
        (
            args.obs == "state",
            "image_size num_filters num_conv_layers feature_dim encoder_tau",
            "--obs state has no conv encoder and no latent head",
        ),
        (
            args.decoder == "none",
            "encoder_lr decoder_lr decoder_weight_decay ae_bits "
            "decoder_latent_lambda ae_update_freq vae_beta",
            "--decoder none has no decoder",
        ),
        (args.decoder == "pixel", "vae_beta", "it weights the KL term of --decoder vae"),
        (
            args.decoder == "vae",
            "decoder_latent_lambda",
            "--decoder vae has its KL term instead of this penalty",
        ),
        (
            args.freeze_encoder,
            "encoder_lr encoder_tau decoder_latent_lambda ae_grad",
            "--freeze-encoder keeps the encoder and its latent heads fixed",
        ),
        (not args.benchmark, "bench_updates", "it sets how many updates --benchmark times"),
        (
            args.benchmark,
            "out_dir total_steps init_steps init_updates eval_freq eval_episodes "
            "checkpoint_freq keep_checkpoints save_video load_encoder freeze_encoder",
            "--benchmark trains nothing",
        ),
    ]
    return {k: why for on, flags, why in table if on for k in flags.split()}


def resume_args(parser, run_dir, typed):
    """The run's saved configuration, with the flags that may change on resume applied."""
    refused = sorted(set(typed) - group(RESUMABLE) - {"resume"})
    if refused:
        raise UsageError(
            f"--{refused[0].replace('_', '-')} cannot be given with --resume (the run "
            f"keeps its folder and configuration); only the flags under "
            f"'{RESUMABLE}' in --help may"
        )
    if not run_dir.strip():
        raise UsageError("--resume is empty; give a run folder")
    if not os.path.isdir(run_dir):
        raise UsageError(f"--resume {run_dir}: no such folder")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UsageError(
            f"--resume {run_dir}: cannot write in it (read-only filesystem or no permission)"
        )
    found = checkpoints(run_dir)
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        if not found:
            raise UsageError(f"--resume {run_dir}: no config.json, so not a run folder") from None
        config = torch.load(found[-1][2], map_location="cpu", weights_only=False)["args"]
        say(
            f"[resume] {run_dir} has no config.json: its configuration is read from "
            f"{os.path.basename(found[-1][2])}, and config.json is written again"
        )
    except (OSError, ValueError) as e:
        remedy = (
            "its checkpoints hold the configuration too: move config.json aside and resume "
            "again to have it rewritten from them"
            if found
            else "no checkpoint holds it"
        )
        raise UsageError(f"--resume {run_dir}: config.json is unreadable ({e}); {remedy}") from None
    defaults = vars(parser.parse_args([]))  # a flag newer than the run: its default
    args = argparse.Namespace(
        **{
            **defaults,
            **{k: v for k, v in config.items() if k in defaults},
            **typed,
            "resume": run_dir,
            "out_dir": run_dir,
        }
    )
    check_device(args.device)
    if not found:
        raise UsageError(
            f"--resume {run_dir}: no checkpoint in {os.path.join(run_dir, 'checkpoints')}"
        )
    if found[-1][0] >= args.total_steps + args.action_repeat:  # its last step may overshoot
        raise UsageError(
            f"--total-steps {args.total_steps}: the run is already at environment "
            f"step {found[-1][0]}; give at least that"
        )
    return args


def check_device(name):
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} but CUDA is not available; valid here: auto, cpu")
    if name.startswith("cuda") and int(name.partition(":")[2] or 0) >= torch.cuda.device_count():
        raise UsageError(
            f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )


def resolve_args(args):
    """Fill the per-task defaults and refuse inconsistent input (UsageError)."""
    suite = load_suite()
    domains = sorted({d for d, _ in suite.ALL_TASKS})
    if args.domain not in domains:
        raise UsageError(f"unknown domain '{args.domain}'; valid domains: {', '.join(domains)}")
    tasks = sorted(t for d, t in suite.ALL_TASKS if d == args.domain)
    if args.task not in tasks:
        raise UsageError(
            f"unknown task '{args.task}' for domain {args.domain}; valid tasks: {', '.join(tasks)}"
        )
    if args.obs == "state" and args.decoder in ("pixel", "vae"):
        raise UsageError(
            f"--decoder {args.decoder} needs --obs pixels (with --obs state there is "
            "no image to reconstruct)"
        )
    if args.obs == "state" and (args.load_encoder or args.freeze_encoder):
        raise UsageError(
            "--load-encoder and --freeze-encoder need --obs pixels (states have no encoder)"
        )
    if args.freeze_encoder and not args.load_encoder:
        raise UsageError(
            "--freeze-encoder needs --load-encoder PATH (a random encoder would stay random)"
        )
    if args.load_encoder:
        path = args.load_encoder
        if not os.path.exists(path):
            raise UsageError(f"--load-encoder {path}: no such file or folder")
        if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "model.pt")):
            raise UsageError(
                f"--load-encoder {path}: no model.pt in it (a run writes it when it "
                "ends); give one of its checkpoints/ckpt_*.pt instead"
            )
        args.load_encoder = os.path.abspath(path)
    args.decoder = args.decoder or ("pixel" if args.obs == "pixels" else "none")
    if args.ae_grad == "separate" and args.decoder == "none":
        raise UsageError(
            "--ae-grad separate needs a decoder (pixel or vae): without one the "
            "encoder would never learn"
        )
    args.action_repeat = args.action_repeat or ACTION_REPEAT.get(args.domain, DEFAULT_REPEAT)
    args.frame_stack = args.frame_stack or (3 if args.obs == "pixels" else 1)
    args.init_updates = args.init_updates or args.init_steps
    args.checkpoint_freq = args.checkpoint_freq or args.eval_freq
    if args.benchmark and args.bench_updates % 2:
        raise UsageError(
            "--bench-updates must be even (actor and targets move every 2nd update), "
            f"got {args.bench_updates}"
        )
    if args.actor_log_std_min >= args.actor_log_std_max:
        raise UsageError("--actor-log-std-min must be below --actor-log-std-max")
    if args.obs == "pixels" and conv_output_size(args.image_size, args.num_conv_layers) < 1:
        raise UsageError(
            f"--image-size {args.image_size} is too small for {args.num_conv_layers} "
            f"conv layers (3x3, the first with stride 2): use at least "
            f"{4 * args.num_conv_layers - 1}"
        )
    if not args.benchmark:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        if args.out_dir is None:
            name = f"{args.domain}-{args.task}-s{args.seed}-{stamp}"
            args.out_dir = os.path.join("runs", name)
        check_out_dir(args.out_dir)
    return args


def check_out_dir(out_dir):
    """A run folder must be new or empty, and creatable: refuse it now rather than after set-up."""
    if not out_dir.strip():
        raise UsageError("--out-dir is empty; give a folder name")
    if os.path.isfile(out_dir):
        raise UsageError(f"--out-dir {out_dir} is a file; give a new folder")
    if os.path.islink(out_dir) and not os.path.exists(out_dir):
        raise UsageError(f"--out-dir {out_dir} is a link to nothing; give a new folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise UsageError(f"--out-dir {out_dir} already exists and is not empty; give a new folder")
    parent = os.path.abspath(out_dir)
    while not os.path.exists(parent):  # the nearest part of the path that exists
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"--out-dir {out_dir}: {parent} is a file, so no folder can be made in it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out-dir {out_dir}: cannot write in {parent} (read-only filesystem or no permission)"
        )


# ====================================================================== --compile and CUDA graphs
def compiled_step(agent, parts):
    """update_step with these parts fixed, through torch.compile (LeanRL's way: the eager code
    stays the code) and on a GPU replayed from a CUDA graph; each variant is compiled, and the
    time printed, at its first use."""
    key = tuple(parts.values())
    if key in agent.compiled:
        return agent.compiled[key]
    import torch._functorch.config

    # torch 2.13 on CPU sometimes crashed (SIGSEGV) writing the backward graph to AOTAutograd's
    # on-disk cache; without that cache it never did.
    torch._functorch.config.enable_autograd_cache = False
    name = "update with critic" + "".join(", " + k[3:] for k, on in parts.items() if on)
    step = torch.compile(functools.partial(agent.update_step, **parts))
    if agent.cuda_graphs:
        if not agent.compiled:  # what the variants share (see CapturedStep)
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
    """fn replayed from a CUDA graph: the update's few hundred kernels launched as one, the GPU no
    longer waiting on Python (PyTorch's "whole-network capture"; LeanRL's CudaGraphModule).

    fn must keep its state in place (parameters, optimizer state with capturable Adam) and read
    its tensors from its arguments, as update_step does. The arguments are copied into buffers of
    fixed address and layout made at the first call, so torch.compile's guards see the same
    inputs every time (the replay buffer's batch is strided views of one tensor, which a clone
    would not be, and a recompile inside a capture breaks it). The first calls run fn on a side
    stream (compilation, cuDNN's autotuner and the optimizer state are set up there), one call
    records it, every later call replays it. An agent's variants share `graphs`: one memory pool
    (they never run at once, and SACAE.update copies their outputs out before the next replay),
    one capture stream on the agent's GPU, and the fate of the first failed capture, after which
    no variant tries again and each runs uncaptured.
    """

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
        pool, capture_stream = self.graphs["pool"], self.graphs["stream"]
        # A recompile cannot be captured: refused by name, with the guard that failed.
        no_recompile = torch._dynamo.config.patch(error_on_recompile=True)
        capture = torch.cuda.graph(graph, pool, capture_stream, capture_error_mode="thread_local")
        try:
            with no_recompile, capture:
                outputs = self.fn(*self.inputs)  # recorded, not run
        except RuntimeError as e:  # torch.AcceleratorError included
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
            cause = e.__context__ or e  # the call the capture refused, if one did
            self.graphs["failed"] = True
            say(
                f"[compile] {self.name}: CUDA-graph capture failed, so the compiled update runs "
                f"without CUDA graphs ({str(cause).splitlines()[0]})"
            )
            return self.fn(*self.inputs)  # this call's update, uncaptured
        self.graph, self.outputs = graph, outputs
        say(
            f"[compile] {self.name}: captured in a CUDA graph in {time.perf_counter() - began:.1f} s"
        )
        self.graph.replay()  # this call's update
        return self.outputs


# ====================================================================================== --benchmark
def benchmark(args):
    """Time updates on a buffer of random frames, and environment steps; print a table, a line."""
    device = pick_device(args.device)
    seed_everything(args.seed)
    env = DMCEnv(
        args.domain,
        args.task,
        args.seed,
        obs=args.obs,
        image_size=args.image_size,
        frame_stack=args.frame_stack,
        action_repeat=args.action_repeat,
    )
    agent = SACAE(env.obs_shape, env.action_dim, device, args)
    buffer = replay_buffer(env, min(args.buffer_size, 10 * env.episode_length), args.seed, device)
    rng = np.random.default_rng(args.seed)
    for i in range(buffer.capacity):
        obs = rng.integers(0, 256, env.obs_shape, dtype=np.uint8)
        if args.obs == "state":
            obs = rng.standard_normal(env.obs_shape).astype(np.float32)
        if i % env.episode_length == 0:
            buffer.add_first(obs)
        buffer.add(rng.uniform(-1, 1, env.action_dim).astype(np.float32), rng.random(), 1.0, obs)

    def timed(fn, n):
        if device.type == "cuda":
            torch.cuda.synchronize()
        began = time.perf_counter()
        for step in range(n):
            fn(step)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - began) * 1000 / n

    warmup = 4 + (6 if args.compile else 0)  # one-off costs: allocator, kernel plans, compilation
    timed(lambda step: agent.update(buffer.sample(args.batch_size), step), warmup)
    n = args.bench_updates
    ms_update = timed(lambda step: agent.update(buffer.sample(args.batch_size), warmup + step), n)
    ms_sample = timed(lambda step: buffer.sample(args.batch_size), n)
    env.reset()
    env_steps, began = 0, time.perf_counter()
    while time.perf_counter() - began < 2.0 or env_steps < 10 * args.action_repeat:
        _, _, _, done, steps = env.step(rng.uniform(-1, 1, env.action_dim))
        env_steps += steps
        if done:
            env.reset()
    env_sps = env_steps / (time.perf_counter() - began)
    name = "cpu" if device.type == "cpu" else "cuda:" + torch.cuda.get_device_name(device)
    name, mode = name.replace(" ", "_"), args.precision + (" + compile" if args.compile else "")
    if agent.cuda_graphs:  # how many variants replay from a CUDA graph (a capture can fail)
        captured = sum(step.graph is not None for step in agent.compiled.values())
        mode += f" + CUDA graphs ({captured} of {len(agent.compiled)} variants)"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (
        1 if sys.platform == "darwin" else 1024
    )
    rows = [
        (
            "task",
            f"{args.domain}-{args.task}, obs {args.obs}, decoder {args.decoder}, "
            f"{args.image_size}px",
        ),
        ("device / precision", f"{name} / {mode}"),
        ("threads", str(torch.get_num_threads())),
        ("batch", str(args.batch_size)),
        ("ms per update (with sampling)", f"{ms_update:.1f}  over {n} updates"),
        ("  of which sampling", f"{ms_sample:.1f}"),
        ("updates per second", f"{1000 / ms_update:.2f}"),
        (
            "env steps per second",
            f"{env_sps:.0f}  (action repeat {args.action_repeat}, rendering included)",
        ),
        ("replay", f"{buffer.bytes_per_transition:,.0f} B per transition, on {buffer.storage}"),
        ("peak resident memory", f"{peak / 2**30:.2f} GiB"),
    ]
    if device.type == "cuda":
        allocated, reserved = (
            f(device) / 2**30
            for f in (torch.cuda.max_memory_allocated, torch.cuda.max_memory_reserved)
        )
        rows.append(("peak CUDA memory", f"{allocated:.2f} GiB allocated, {reserved:.2f} reserved"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(
        f"benchmark ms_per_update={ms_update:.3f} updates_per_s={1000 / ms_update:.3f} "
        f"env_steps_per_s={env_sps:.1f} replay_bytes_per_transition="
        f"{round(buffer.bytes_per_transition)} device={name} precision={args.precision}"
    )


# =========================================================================================== --plot
def read_eval_csv(path):
    """(env_step, mean, std) arrays of an eval.csv; UsageError if it is not one."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        columns = ("env_step", "episode_return_mean", "episode_return_std")
        table = np.array([[float(r[c]) for c in columns] for r in rows]).reshape(-1, 3)
    except OSError as e:
        raise UsageError(f"--plot {path}: cannot read it ({e.strerror})") from None
    except (KeyError, TypeError, ValueError, UnicodeDecodeError, csv.Error):
        raise UsageError(
            f"--plot {path}: not an eval.csv written by sac_ae.py (needs the columns "
            "env_step, episode_return_mean, episode_return_std)"
        ) from None
    if not len(table):
        raise UsageError(f"--plot {path}: no evaluation rows yet")
    return table.T


def plot(paths):
    """eval.csv -> learning_curve.png beside it: mean return with a +-1 std band over env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for path in paths:
        x, y, s = read_eval_csv(path)
        folder = os.path.dirname(os.path.abspath(path))
        title = os.path.basename(folder)  # unless the run's config.json says more
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            with open(os.path.join(folder, "config.json")) as f:
                c = json.load(f)
            mode = {"pixel": "SAC+AE", "none": "SAC:pixel", "vae": "SAC+VAE"}[c["decoder"]]
            mode = "SAC:state" if c["obs"] == "state" else mode
            title = f"{c['domain']} {c['task']}, {mode}, seed {c['seed']}, batch {c['batch_size']}"
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(x, y, marker="o", markersize=3)
        ax.fill_between(x, y - s, y + s, alpha=0.25)
        ax.set(xlabel="environment steps", ylabel="evaluation return", title=title, ylim=(0, 1000))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = os.path.join(folder, "learning_curve.png")
        fig.savefig(out)
        plt.close(fig)
        print(f"[plot] {out}")


# ============================================================================ main: the one boundary
def main(argv=None):
    """Run the command line. Every user mistake and every fault ends here in one line on stderr
    and an exit status: 2 for a mistake, 1 for a fault, 128 + N for signal N."""
    args = None
    try:
        args = parse_args(argv)
        if args.plot:
            return plot(args.plot)
        return benchmark(args) if args.benchmark else train(args)
    except (UsageError, KeyboardInterrupt, Interrupted, Exception) as e:
        line, code = explain(e, args)
        if line is None:
            raise  # a bug: its traceback
        print(f"sac_ae.py: error: {line}", file=sys.stderr)
        return code


def explain(e, args):
    """(the one line, the exit status) for a mistake or a fault; (None, None) for a bug."""
    run_dir = args.out_dir if args is not None and not args.benchmark and not args.plot else None
    last, folder = latest_checkpoint(run_dir), run_dir and os.path.isdir(run_dir)
    if last:
        then = f"the last checkpoint {last} is intact: resume with python {sys.argv[0]} --resume {run_dir}"
    elif folder:
        then = f"no checkpoint was written yet: remove {run_dir} and start the run again"
    else:
        then = "nothing was written"
    if isinstance(e, UsageError):
        return str(e), 2
    if isinstance(e, (KeyboardInterrupt, Interrupted)):
        signum = getattr(e, "signum", signal.SIGINT)
        how = f"a second {signal.Signals(signum).name}" if isinstance(e, Interrupted) else "SIGINT"
        then = "--benchmark stopped" if args is not None and args.benchmark else then
        return f"interrupted by {how}, at once; {then}", 128 + signum
    if isinstance(e, (RenderError, NonFiniteError)):
        return f"{e}; {then}" if isinstance(e, NonFiniteError) else str(e), 1
    if type(e) is RuntimeError and isinstance(e.__context__, OSError):
        e = e.__context__  # torch.save's zip writer reports a failed write so
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        if run_dir and not os.path.isdir(run_dir):
            return (
                f"{e.strerror or e}{where}: the run folder {run_dir} is gone; start the run again",
                1,
            )
        advice = {28: "free some space", 30: "make the disk writable", 13: "fix its permissions"}
        then = f"{advice.get(e.errno, 'fix that')}; {then}"
        if e.filename and str(e.filename).endswith("model.pt.tmp"):
            then += " (it writes model.pt again)"
        return f"writing the run folder failed: {e.strerror or e}{where}; {then}", 1
    message = " ".join(str(e).split())
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in message:
        return (
            f"out of memory ({message}); lower --hidden-dim, --batch-size, --image-size or "
            "--buffer-size"
        ), 1
    if type(e).__name__ == "PhysicsError":  # dm_control's simulator diverged
        return (
            f"the simulation became unstable ({message}); rerun with another --seed or a lower "
            "learning rate"
        ), 1
    return None, None


if __name__ == "__main__":
    sys.exit(main())
