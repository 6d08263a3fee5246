"""SAC+AE: soft actor-critic from pixels, made stable by a regularized autoencoder.

Yarats et al., "Improving Sample Efficiency in Model-Free Reinforcement Learning from Images"
(arXiv 1910.01741). A conv encoder is shared by the critic and a deterministic decoder: the
critic's and the decoder's gradients shape it, the actor's never do (Sec. 5). Read top to bottom:
networks, the agent and its update, environment, replay buffer, evaluation, training loop, flags.
Below the "tooling" banner: checkpoints and resume, --benchmark, --plot, main().

    python sac_ae.py --domain cheetah --task run --seed 3
"""

import argparse
import collections
import contextlib
import copy
import csv
import ctypes
import ctypes.util
import functools
import json
import math
import os
import pickle
import random
import re
import signal
import sys
import time
import warnings
import zipfile
import zlib

# Headless rendering by default; dm_control reads this once, when it is first imported.
os.environ.setdefault("MUJOCO_GL", "egl")


def interrupted_while_starting(signum, frame):  # Ctrl-C while torch loads: a line, no traceback
    print("sac_ae.py: interrupted while starting; nothing was written", file=sys.stderr)
    raise SystemExit(128 + signum)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted_while_starting)  # main() puts Python's back

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


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
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim), nn.ReLU(),
        nn.Linear(hidden_dim, hidden_dim), nn.ReLU(),
        nn.Linear(hidden_dim, out_dim),
    )  # fmt: skip


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
        image_size = obs_shape[-1]
        layers = [nn.Conv2d(obs_shape[0], num_filters, 3, stride=2), nn.ReLU(inplace=True)]
        for _ in range(num_layers - 1):
            layers += [nn.Conv2d(num_filters, num_filters, 3, stride=1), nn.ReLU(inplace=True)]
        self.convs = nn.Sequential(*layers)
        self.repr_dim = num_filters * conv_output_size(image_size, num_layers) ** 2

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
            layers += [
                nn.ConvTranspose2d(num_filters, num_filters, 3, stride=1),
                nn.ReLU(inplace=True),
            ]
        # The stride-2 layer gives back 2s+1 pixels; output_padding adds the one an even size lost.
        padding = (image_size - 3) % 2
        layers.append(
            nn.ConvTranspose2d(num_filters, out_channels, 3, stride=2, output_padding=padding)
        )
        self.deconvs = nn.Sequential(*layers)

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
        pixels = args.obs == "pixels"
        self.encoder = Encoder(obs_shape, args.num_filters, args.num_conv_layers, pixels)
        repr_dim = self.encoder.repr_dim
        log_std_bounds = (args.actor_log_std_min, args.actor_log_std_max)
        self.actor = Actor(repr_dim, args.feature_dim, action_dim, args.hidden_dim, log_std_bounds,
                           pixels)  # fmt: skip
        self.critic = Critic(repr_dim, args.feature_dim, action_dim, args.hidden_dim, pixels,
                             vae=args.decoder == "vae")  # fmt: skip
        self.decoder = None
        if args.decoder in ("pixel", "vae"):
            self.decoder = Decoder(obs_shape[0], args.image_size, args.feature_dim,
                                   args.num_filters, args.num_conv_layers)  # fmt: skip
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
            betas = (beta1, 0.999)
            return torch.optim.Adam(params, lr, betas, weight_decay=weight_decay, fused=True,
                                    capturable=self.cuda_graphs)  # fmt: skip

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
            self.decoder_opt = adam(
                self.decoder.parameters(), args.decoder_lr, weight_decay=args.decoder_weight_decay
            )
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
            update_step = self.compiled_step(parts)
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
        return {"actor_loss": actor_loss, "alpha_loss": alpha_loss, "alpha": self.alpha,
                "entropy": -log_pi.mean()}  # fmt: skip

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
        # written with an integer shift, in place: 22 ms less per update than the formula above
        # at batch 128 on 2 CPU cores (AMD EPYC), about 6% of a bf16 update there.
        noise = torch.rand_like(pixels, dtype=torch.float32)
        target = noise.add_(pixels >> (8 - self.args.ae_bits)).div_(2**self.args.ae_bits).sub_(0.5)
        z = self.critic.head(h)
        metrics = {}
        if self.args.decoder == "vae":
            z, log_var = z.float(), self.critic.log_var(h).float()
            sample = z + torch.randn_like(z) * (0.5 * log_var).exp()  # reparameterised
            recon_loss = F.mse_loss(self.decoder(sample).float(), target)
            kl = kl_to_standard_normal(z, log_var)
            loss = recon_loss + self.args.vae_beta * kl
            metrics["kl"] = kl
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
        cuDNN convolve NHWC fastest (about 1.5x on our CPU), the maths is the same. States pass."""
        if obs.dtype != torch.uint8:
            return obs
        return obs.contiguous(memory_format=torch.channels_last).float().div_(255.0)

    @torch.no_grad()
    def act(self, obs, deterministic=False):
        """One action in [-1, 1]^A: sampled while training, tanh(mean) for evaluation."""
        obs = self.prepare(torch.as_tensor(obs, device=self.device).unsqueeze(0))
        with self.autocast():
            mu, log_std = self.actor(self.encoder(obs))
        action = torch.tanh(mu) if deterministic else sample_action(mu, log_std)[0]
        action = action[0].cpu().numpy()
        if not np.isfinite(action).all():  # never hand the simulator a NaN: it would fail there
            raise NonFiniteError(f"the policy's action became {action.tolist()}")
        return action

    @torch.no_grad()
    def latent(self, obs):
        """The critic's z of one observation (the posterior mean with --decoder vae)."""
        obs = self.prepare(torch.as_tensor(obs, device=self.device).unsqueeze(0))
        with self.autocast():
            return self.critic.head(self.encoder(obs))[0].float().cpu().numpy()

    @torch.no_grad()
    def reconstruct(self, obs):
        obs = self.prepare(torch.as_tensor(obs, device=self.device).unsqueeze(0))
        with self.autocast():
            return self.decoder(self.critic.head(self.encoder(obs)))[0].float().cpu().numpy()

    def autocast(self):
        bf16, cache = self.args.precision == "bf16", not self.cuda_graphs  # a graph has no cache
        return torch.autocast(self.device.type, torch.bfloat16, enabled=bf16, cache_enabled=cache)

    # ------------------------------------------------------------------------ bookkeeping
    @property
    def cuda_graphs(self):
        """--compile on a GPU replays the update from CUDA graphs (CapturedStep, below)."""
        return self.args.compile and self.device.type == "cuda"

    def networks(self):
        nets = {"encoder": self.encoder, "actor": self.actor, "critic": self.critic}
        nets.update(encoder_target=self.encoder_target, critic_target=self.critic_target)
        if self.decoder is not None:
            nets["decoder"] = self.decoder
        return nets

    def optimizers(self):
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.optim.Optimizer)}

    def to(self, device):
        for net in self.networks().values():
            net.to(device, memory_format=torch.channels_last)  # conv kernels NHWC, as their inputs
        self.log_alpha = self.log_alpha.to(device).requires_grad_()
        return self

    def parameters(self):
        return [self.log_alpha, *(p for net in self.networks().values() for p in net.parameters())]

    def state_dict(self):
        state = {k: m.state_dict() for k, m in {**self.networks(), **self.optimizers()}.items()}
        state["log_alpha"] = self.log_alpha.detach().clone()
        return state

    def load_state_dict(self, state):
        for k, m in {**self.networks(), **self.optimizers()}.items():
            m.load_state_dict(state[k])
        self.set_capturable(self.cuda_graphs)  # the checkpoint's run may have had other flags
        self.compiled = {}  # CUDA graphs hold the old optimizer state's addresses: capture anew
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])

    def set_capturable(self, on):
        """Adam's capturable mode (step counts on the GPU) is needed inside a CUDA graph, and
        only costs outside one."""
        for opt in self.optimizers().values():
            for group in opt.param_groups:
                group["capturable"] = on

    def train(self, training=True):
        for net in self.networks().values():
            net.train(training)

    def load_encoder(self, path):
        """Copy the encoder and both latent heads from another run (transfer, Fig. 7); the target
        encoder and the target critic's head start as copies of them."""
        file = os.path.join(path, "model.pt") if os.path.isdir(path) else path
        try:
            damaged = zip_damage(file)
            if damaged:
                raise ValueError(damaged)
            payload = torch.load(file, map_location="cpu", weights_only=False)
            saved = payload.get("agent", payload)  # a checkpoint, or model.pt
            encoder, critic, actor = saved["encoder"], saved["critic"], saved["actor"]
        except Exception as e:
            raise UsageError(
                f"--load-encoder {path}: no encoder weights of this version of "
                f"sac_ae.py in {file} ({' '.join(str(e).split())[:160]})"
            ) from None
        if payload.get("config", {}).get("obs") == "state":
            raise UsageError(f"--load-encoder {path}: a SAC:state run has no encoder to give")
        try:
            self.encoder.load_state_dict(encoder)
            for net, saved_net in ((self.critic, critic), (self.actor, actor)):
                net.head.load_state_dict(
                    {k[5:]: v for k, v in saved_net.items() if k[:5] == "head."}
                )
        except RuntimeError as e:
            raise UsageError(
                f"--load-encoder {path}: its encoder does not fit this one (image size, "
                f"filters, layers or feature dim differ: {' '.join(str(e).split())[:200]})"
            ) from None
        self.encoder_target.load_state_dict(self.encoder.state_dict())
        self.critic_target.head.load_state_dict(self.critic.head.state_dict())

    def compiled_step(self, parts):
        """update_step with these parts fixed, through torch.compile (LeanRL's way: the eager code
        stays the code) and on a GPU replayed from a CUDA graph; each combination is compiled,
        and the time printed, at its first use."""
        key = tuple(parts.values())
        if key in self.compiled:
            return self.compiled[key]
        # torch 2.13 on CPU sometimes crashes (SIGSEGV) pickling the backward graph into its
        # on-disk AOTAutograd cache, 1 compile in 3 here; without that cache it never did.
        import torch._functorch.config

        torch._functorch.config.enable_autograd_cache = False
        name = "update with critic" + "".join(", " + k[3:] for k, on in parts.items() if on)
        step = torch.compile(functools.partial(self.update_step, **parts))
        if self.cuda_graphs:
            if not self.compiled:  # what the variants share (see CapturedStep)
                pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
                self.graphs = {"pool": pool, "stream": stream, "failed": False}
            step = CapturedStep(step, self.device, name, self.graphs)
        self.compiled[key] = step

        def first_call(*batch):
            began = time.perf_counter()
            metrics = step(*batch)
            print(f"[compile] {name}: compiled in {time.perf_counter() - began:.1f} s", flush=True)
            return metrics

        return first_call

    def __getstate__(self):  # a copy (the ETA's timing probe) compiles its own update
        return {**self.__dict__, "compiled": {}, "graphs": None}


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
        try:
            with no_recompile, torch.cuda.graph(graph, pool, capture_stream,
                                                capture_error_mode="thread_local"):  # fmt: skip
                outputs = self.fn(*self.inputs)  # recorded, not run
        except RuntimeError as e:  # torch.AcceleratorError included
            torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
            cause = e.__context__ or e  # the call the capture refused, if one did
            self.graphs["failed"] = True
            why = str(cause).splitlines()[0][:160]
            print(f"[compile] {self.name}: CUDA-graph capture failed, so the compiled update runs "
                  f"without CUDA graphs ({why})", flush=True)  # fmt: skip
            return self.fn(*self.inputs)  # this call's update, uncaptured
        self.graph, self.outputs = graph, outputs
        print(f"[compile] {self.name}: captured in a CUDA graph in "
              f"{time.perf_counter() - began:.1f} s", flush=True)  # fmt: skip
        self.graph.replay()  # this call's update
        return self.outputs


# =================================== environment (Sec. 4.1: the DeepMind Control Suite from pixels)
ACTION_REPEAT = {
    "cartpole": 8,
    "reacher": 4,
    "cheetah": 4,
    "finger": 2,
    "ball_in_cup": 4,
    "walker": 2,
}
DEFAULT_REPEAT = 2
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
        if obs == "pixels":  # MuJoCo renders offscreen into a buffer the model's XML sizes
            visual = self.env.physics.model.vis.global_
            if image_size > min(visual.offwidth, visual.offheight):
                raise UsageError(
                    f"--image-size {image_size} is larger than {domain}'s offscreen buffer "
                    f"({visual.offwidth}x{visual.offheight}); use at most "
                    f"{min(visual.offwidth, visual.offheight)}"
                )
        spec = self.env.action_spec()
        self.action_dim = spec.shape[0]
        self._low, self._high = spec.minimum.astype(np.float64), spec.maximum.astype(np.float64)
        self.frames = collections.deque(maxlen=frame_stack)
        self.frame_shape = (3, image_size, image_size) if obs == "pixels" else (self.state_dim,)
        self.obs_shape = (self.frame_shape[0] * frame_stack, *self.frame_shape[1:])
        # Agent steps per episode: the time limit, in physics steps, over the action repeat.
        if not math.isfinite(self.env._step_limit):
            raise UsageError(
                f"{domain}-{task} has no time limit; this script needs episodes that end"
            )
        if action_repeat > self.env._step_limit:
            raise UsageError(
                f"--action-repeat {action_repeat} is longer than {domain}-{task}'s episodes "
                f"({round(self.env._step_limit)} steps)"
            )
        self.episode_env_steps = round(self.env._step_limit)
        self.episode_length = math.ceil(self.episode_env_steps / action_repeat)

    def agent_steps(self, env_steps):
        """Agent steps that take env_steps environment steps (an episode's last may be short)."""
        episodes, rest = divmod(env_steps, self.episode_env_steps)
        return episodes * self.episode_length + math.ceil(rest / self.action_repeat)

    @property
    def state_dim(self):
        return sum(int(np.prod(s.shape)) for s in self.env.observation_spec().values())

    @property
    def state_groups(self):
        """(name, size) of the task's proprioceptive observations, e.g. position, velocity."""
        return [(k, int(np.prod(s.shape))) for k, s in self.env.observation_spec().items()]

    def _frame(self, time_step):
        # The true proprioceptive state, always kept: the linear probe (Fig. 6) reads it.
        self.state = np.concatenate(
            [np.asarray(v, np.float32).ravel() for v in time_step.observation.values()]
        )
        if self.obs_type == "state":
            return self.state
        image = self.render(self.image_size)
        return np.ascontiguousarray(image.transpose(2, 0, 1))  # (H, W, 3) -> (3, H, W)

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
    ):
        self.k, self.frame_shape, self.capacity, self.device = (
            frame_stack,
            tuple(frame_shape),
            capacity,
            device,
        )
        self.size = (
            capacity + math.ceil(capacity / episode_length) + 1 + frame_stack
        )  # slots in the ring
        need = self.size * (
            int(np.prod(frame_shape)) * np.dtype(frame_dtype).itemsize + 4 * (action_dim + 3)
        )
        available = available_memory()
        if available is not None and need > available:
            raise UsageError(
                f"the replay buffer needs {need / 2**30:.1f} GiB for {capacity:,} transitions "
                f"but only {available / 2**30:.1f} GiB is free; lower --buffer-size "
                "(--total-steps with --resume)"
            )
        try:
            self.frames = np.empty((self.size, *frame_shape), dtype=frame_dtype)
            self.action = np.empty((self.size, action_dim), dtype=np.float32)
            self.reward = np.empty(self.size, dtype=np.float32)
            self.not_done = np.empty(self.size, dtype=np.float32)
            self.age = np.empty(self.size, dtype=np.int32)
        except MemoryError:
            raise UsageError(
                f"cannot allocate {need / 2**30:.1f} GiB for the replay buffer; lower "
                "--buffer-size (--total-steps with --resume)"
            ) from None
        self.t = 0  # slots ever written; slot t lives at index t % size
        self.has_transition = False
        self.rng = np.random.default_rng(seed)
        self.pin = device.type == "cuda"

    @property
    def nbytes(self):
        return sum(
            a.nbytes for a in (self.frames, self.action, self.reward, self.not_done, self.age)
        )

    @property
    def bytes_per_transition(self):
        return self.nbytes / self.capacity

    def _write(self, frame, age, action=None, reward=0.0, not_done=0.0):
        i = self.t % self.size
        self.frames[i] = frame
        self.age[i] = age
        if action is not None:
            self.action[i], self.reward[i], self.not_done[i] = action, reward, not_done
        self.t += 1

    def add_first(self, obs):
        """The first observation of an episode: keep its newest frame."""
        self._write(obs[-self.frame_shape[0] :], 0)

    def add(self, action, reward, not_done, next_obs):
        """A transition: keep the newest frame of next_obs; obs is already in the ring."""
        self._write(
            next_obs[-self.frame_shape[0] :],
            self.age[(self.t - 1) % self.size] + 1,
            action,
            reward,
            not_done,
        )
        self.has_transition = True

    def _valid(self, t):
        """Slots that are transitions whose every frame is still in the ring."""
        age = self.age[t % self.size]
        return (age > 0) & (t - np.minimum(age, self.k) >= self.t - self.size)

    def sample_slots(self, n):
        """n transition slots, uniformly with replacement over the valid ones (by rejection)."""
        if not self.has_transition:  # once there is one, the newest is always valid: the loop ends
            raise RuntimeError("the replay buffer holds no transition yet")
        picked = []
        while sum(len(x) for x in picked) < n:
            t = self.rng.integers(max(0, self.t - self.size), self.t, size=2 * n)
            picked.append(t[self._valid(t)])
        return np.concatenate(picked)[:n]

    def get(self, t):
        """Transitions at slots t: (obs, action, reward, next_obs, not_done), tensors on device."""
        i = t % self.size
        back = np.minimum(np.arange(self.k + 1)[None], self.age[i][:, None])  # (B, k+1) steps back
        frames = torch.from_numpy(
            self.frames[(t[:, None] - back) % self.size]
        )  # (B, k+1, C, H, W), newest first
        scalars = torch.from_numpy(
            np.concatenate([self.action[i], self.reward[i, None], self.not_done[i, None]], axis=1)
        )
        if self.pin:
            frames, scalars = frames.pin_memory(), scalars.pin_memory()
        frames = frames.to(self.device, non_blocking=True).flip(1)  # oldest first
        scalars = scalars.to(self.device, non_blocking=True)
        b = len(t)
        obs = frames[:, : self.k].reshape(b, -1, *self.frame_shape[1:])  # (B, k*C, H, W)
        next_obs = frames[:, 1:].reshape(b, -1, *self.frame_shape[1:])
        return obs, scalars[:, :-2], scalars[:, -2:-1], next_obs, scalars[:, -1:]

    def sample(self, n):
        return self.get(self.sample_slots(n))

    # Checkpoints store the ring as append-only chunk files, each slot written once: a checkpoint
    # writes only the slots added since the previous one.
    def save_chunk(self, folder, start):
        """Write slots [start, t) that are still in the ring to folder/replay_{start}_{t}.npz."""
        start = max(start, self.t - self.size)
        if start >= self.t:
            return
        i = np.arange(start, self.t) % self.size
        path = os.path.join(folder, f"replay_{start:012d}_{self.t:012d}.npz")
        with atomic_write(path) as f:
            np.savez(
                f,
                frames=self.frames[i],
                action=self.action[i],
                reward=self.reward[i],
                not_done=self.not_done[i],
                age=self.age[i],
            )

    def load_chunks(self, folder, t):
        """Refill the ring as it was when t slots had been written."""
        self.t, need = t, max(0, t - self.size)
        for start, end, path in replay_chunks(folder):
            lo, hi = max(start, need), min(end, t)
            if lo >= hi:
                continue
            if lo != need:
                raise UsageError(f"replay chunk missing for slots {need}..{lo} in {folder}")
            try:
                with np.load(path) as chunk:
                    i, part = np.arange(lo, hi) % self.size, slice(lo - start, hi - start)
                    self.frames[i], self.action[i], self.reward[i] = (
                        chunk["frames"][part],
                        chunk["action"][part],
                        chunk["reward"][part],
                    )
                    self.not_done[i], self.age[i] = chunk["not_done"][part], chunk["age"][part]
            except Exception as e:
                raise UsageError(
                    f"replay chunk {path} is unreadable "
                    f"({e.__class__.__name__}: truncated or corrupt)"
                ) from None
            need = hi
        if need != t:
            raise UsageError(
                f"replay chunks in {folder} end at slot {need}, the checkpoint needs {t}"
            )
        self.has_transition = bool(
            (self.age[np.arange(max(0, t - self.size), t) % self.size] > 0).any()
        )


def replay_chunks(folder):
    """(start, end, path) of the replay chunk files in folder, in order."""
    found = [re.fullmatch(r"replay_(\d+)_(\d+)\.npz", name) for name in os.listdir(folder)]
    return sorted((int(m[1]), int(m[2]), os.path.join(folder, m[0])) for m in found if m)


def available_memory():
    """Bytes the kernel says a new allocation can have (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


# ======================================================================================= evaluation
def evaluate(env, agent, episodes, video_path=None, probe=False, stop=None):
    """Deterministic policy (tanh of the mean) on the evaluation environment.

    Returns the episode returns and, with probe=True, the critic's latent and the true state of
    every visited observation, and one observation from the first episode to reconstruct; None
    as soon as `stop` (the training loop's record of signals) is not empty.
    """
    returns, frames, latents, states, sample = [], [], [], [], None
    for episode in range(episodes):
        obs, done, total, t = env.reset(), False, 0.0, 0
        record = video_path is not None and episode == 0
        while not done:
            if stop:
                return None
            if record:
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
    return (
        returns,
        (np.stack(latents) if probe else None),
        (np.stack(states) if probe else None),
        sample,
    )


def linear_probe(latents, states, groups):
    """Fig. 6: least-squares map latent -> true state fitted on the first half of the frames, R^2 on
    the second half. R^2 is per state dimension, averaged over dimensions (those that vary), overall
    and per group of the task's observations; NaN with fewer than 4 frames per coefficient in the
    fitting half. Returns {"probe_r2": .., "probe_r2_<group>": ..}."""
    n = len(latents) // 2
    x = np.concatenate([latents, np.ones((len(latents), 1))], axis=1).astype(
        np.float64
    )  # with a bias
    y = states.astype(np.float64)
    if n < 4 * x.shape[1]:  # too few frames: the fit would memorise them and R^2 mean nothing
        return {
            "probe_r2": float("nan"),
            **{f"probe_r2_{name}": float("nan") for name, _ in groups},
        }
    weights, *_ = np.linalg.lstsq(x[:n], y[:n], rcond=None)
    residual = ((y[n:] - x[n:] @ weights) ** 2).sum(0)
    total = ((y[n:] - y[n:].mean(0)) ** 2).sum(0)
    varies = total > 1e-12
    r2 = np.where(varies, 1 - residual / np.where(varies, total, 1), np.nan)
    out, start = {"probe_r2": float(np.nanmean(r2)) if varies.any() else float("nan")}, 0
    for name, size in groups:
        part = r2[start : start + size]
        out[f"probe_r2_{name}"] = (
            float(np.nanmean(part)) if np.isfinite(part).any() else float("nan")
        )
        start += size
    return out


def reconstruction_image(obs, recon, frame_channels=3):
    """(k*3, H, W) uint8 observation and its reconstruction in [-0.5, 0.5] -> one (2H, kW, 3) uint8
    picture: the k stacked frames on top, their reconstructions below."""
    rebuilt = np.clip((recon + 0.5) * 255.0, 0, 255).round().astype(np.uint8)
    rows = [
        np.concatenate(
            [
                im[i : i + frame_channels].transpose(1, 2, 0)
                for i in range(0, len(im), frame_channels)
            ],
            1,
        )
        for im in (obs, rebuilt)
    ]
    return np.concatenate(rows, axis=0)


# ==================================================================================== training loop
class CSVLog:
    """Append rows to a CSV file, writing the header once and flushing every row."""

    def __init__(self, path, fields):
        self.fields = fields
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=fields, extrasaction="ignore")
        if self.file.tell() == 0:
            self.writer.writeheader()

    def write(self, row):
        self.writer.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        )
        self.file.flush()

    def close(self):
        self.file.close()


EVAL_FIELDS = [
    "env_step",
    "agent_step",
    "episode_return_mean",
    "episode_return_std",
    "episode_return_min",
    "episode_return_max",
    "episodes",
    "wall_time",
]
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


# CleanRL's names, so its users find the curves where they expect them.
TENSORBOARD_TAGS = {
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


def duration(seconds):
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


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
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    return device


def render_on_training_gpu(device_name):
    """Point dm_control's EGL at the GPU that trains: the EGL device that says it is that CUDA
    device. EGL lists GPUs in its own order (not CUDA's, nor nvidia-smi's) and may or may not
    drop those CUDA_VISIBLE_DEVICES hides, so no index arithmetic is right everywhere. A value
    the user set is left alone; where no EGL device says which GPU it is, EGL chooses."""
    if os.environ.get("MUJOCO_GL") != "egl" or "MUJOCO_EGL_DEVICE_ID" in os.environ:
        return
    if device_name == "cpu" or not torch.cuda.is_available():
        return
    index = int(device_name.partition(":")[2] or 0)  # cuda:N, as this process numbers GPUs
    cuda_of_egl = egl_devices_cuda_index()
    if index in cuda_of_egl:
        os.environ["MUJOCO_EGL_DEVICE_ID"] = str(cuda_of_egl.index(index))


def egl_devices_cuda_index():
    """For each EGL device in EGL's order, the CUDA device it is (as this process numbers them,
    EGL_NV_device_cuda), or None where the driver does not say (Mesa); [] without libEGL. Plain
    ctypes: importing dm_control's EGL module would open its display before we choose one."""
    try:  # libOpenGL first, globally, as dm_control loads it (NVIDIA's threads need it so)
        ctypes.CDLL(ctypes.util.find_library("OpenGL") or "libOpenGL.so.0", ctypes.RTLD_GLOBAL)
    except OSError:
        pass
    try:
        egl = ctypes.CDLL(ctypes.util.find_library("EGL") or "libEGL.so.1")
    except OSError:
        return []
    egl.eglGetProcAddress.restype = ctypes.c_void_p
    egl.eglGetProcAddress.argtypes = [ctypes.c_char_p]
    devices_fn = egl.eglGetProcAddress(b"eglQueryDevicesEXT")
    attrib_fn = egl.eglGetProcAddress(b"eglQueryDeviceAttribEXT")
    if not devices_fn or not attrib_fn:
        return []
    p, i32 = ctypes.POINTER, ctypes.c_int32  # EGLBoolean and EGLint are 32-bit
    query_devices = ctypes.CFUNCTYPE(i32, i32, p(ctypes.c_void_p), p(i32))(devices_fn)
    query_attrib = ctypes.CFUNCTYPE(i32, ctypes.c_void_p, i32, p(ctypes.c_ssize_t))(attrib_fn)
    devices, count = (ctypes.c_void_p * 64)(), i32(0)
    if not query_devices(64, devices, ctypes.byref(count)):
        return []
    found = []
    for device in devices[: count.value]:
        cuda = ctypes.c_ssize_t(-1)
        ok = query_attrib(device, 0x323A, ctypes.byref(cuda))  # EGL_CUDA_DEVICE_NV
        found.append(cuda.value if ok else None)
    egl.eglGetError()  # clear the error a device without the attribute left for dm_control
    return found


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def versions():
    import importlib.metadata as md

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
    for pkg in ("dm_control", "mujoco"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def time_one_update(agent, obs_shape, action_dim, batch_size, device):
    """Seconds per update, timed on a throwaway copy of the agent (the run's RNG is untouched)."""
    probe = copy.deepcopy(agent)
    probe.args = argparse.Namespace(**{**vars(agent.args), "compile": False})  # no compile wait
    probe.set_capturable(False)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        obs = torch.zeros(
            (batch_size, *obs_shape),
            dtype=torch.uint8 if len(obs_shape) == 3 else torch.float32,
            device=device,
        )
        batch = (
            obs,
            torch.zeros(batch_size, action_dim, device=device),
            torch.zeros(batch_size, 1, device=device),
            obs,
            torch.ones(batch_size, 1, device=device),
        )
        times = []
        for step in range(4):  # the first includes one-off setup; even and odd steps differ
            start = time.perf_counter()
            probe.update(batch, step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return sum(times[2:]) / 2


def time_env_steps(args, env_kwargs, steps=5):
    """Seconds per environment step (physics and rendering), on a throwaway copy of the task."""
    env = DMCEnv(args.domain, args.task, args.seed, **env_kwargs)
    env.reset()
    start, done = time.perf_counter(), 0
    for _ in range(steps):
        done += env.step(np.zeros(env.action_dim))[4]
    return (time.perf_counter() - start) / done


class EpisodeMetrics:
    """The update metrics of one training episode, kept on the device until its one host sync.

    Each update writes one row of a preallocated table. (Keeping each update's metrics as tensors
    of their own, a few bytes each, pinned the allocator's heap between the batch's large
    buffers: resident memory grew about 3 MB per update at batch 128 on CPU.)
    """

    def __init__(self, device, names=None):
        self.names = names or METRICS
        self.table = torch.zeros(64, len(self.names), device=device)
        self.steps, self.present, self.columns = [], [], {}

    def add(self, step, metrics):
        if len(self.steps) == len(self.table):  # grow by doubling: rare allocations
            self.table = torch.cat([self.table, torch.zeros_like(self.table)])
        names = tuple(n for n in self.names if n in metrics)
        if names not in self.columns:  # an index tensor on the device, made once per set of names
            index = [self.names.index(n) for n in names]
            self.columns[names] = torch.tensor(index, device=self.table.device)
        row = torch.stack([metrics[n].float() for n in names])
        self.table[len(self.steps)].index_copy_(0, self.columns[names], row)
        self.steps.append(step)
        self.present.append(names)

    def means(self):
        """Each metric's mean over the episode's updates. Raises NonFiniteError naming the first
        NaN or inf loss and the agent step it appeared at."""
        values, means = self.table[: len(self.steps)].cpu(), {}
        for j, name in enumerate(self.names):
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
        return {
            "steps": self.steps,
            "present": self.present,
            "values": self.table[: len(self.steps)].cpu(),
        }

    def load_state_dict(self, state):
        self.clear()
        values = state["values"].to(self.table.device)  # a checkpoint's rows are on the CPU
        for step, names, row in zip(state["steps"], state["present"], values):
            self.add(step, {n: row[self.names.index(n)] for n in names})


def updates_left(agent_step, total_agent_steps, init_steps, init_updates):
    """Updates still to run at agent steps agent_step, agent_step + 1, ...: none before init_steps,
    init_updates at it (the authors' burst), then one per agent step."""
    left = max(0, total_agent_steps - max(agent_step, init_steps))
    if agent_step <= init_steps < total_agent_steps:
        left += init_updates - 1
    return left


class Clock:
    """Seconds and environment steps of one kind of work, for fps and the ETA."""

    def __init__(self):
        self.seconds, self.steps = 0.0, 0

    def add(self, seconds, steps):
        self.seconds, self.steps = self.seconds + seconds, self.steps + steps

    @property
    def fps(self):
        return self.steps / self.seconds if self.seconds > 0 else float("nan")


def train(args):
    device = pick_device(args.device)
    stop = {}  # the signals received: the first asks for a checkpoint, a second to leave at once
    critical = []  # non-empty while a checkpoint or model.pt is written: a second signal waits

    def on_signal(signum, frame):
        if stop and not critical:
            raise Interrupted(signum)
        if stop:
            stop["again"] = signum
            return
        stop["signum"] = signum
        print(
            f"[signal] {signal.Signals(signum).name}: finishing this update or step (an "
            "evaluation under way is left to redo on resume), then writing a checkpoint (send it "
            "again to quit without one)",
            flush=True,
        )

    handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.ExitStack() as held:  # the run folder's lock, released on the way out
            return train_loop(args, device, stop, critical, held)
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)


def lock_run_folder(run_dir, held):
    """An exclusive lock (flock) on the run folder for as long as this process writes it: a second
    run or resume of the same folder is refused instead of interleaving their files."""
    try:
        import fcntl
    except ImportError:  # not on a POSIX system: no lock
        return
    fd = os.open(run_dir, os.O_RDONLY)
    held.callback(os.close, fd)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UsageError(
            f"{run_dir} is being written by another sac_ae.py process; wait for it to end or "
            "stop it"
        ) from None
    except OSError as e:  # NFS, Lustre, some FUSE: no flock on a folder
        print(f"[lock] cannot lock {run_dir} ({e.strerror}): nothing stops a second process "
              "from writing into it", flush=True)  # fmt: skip


@contextlib.contextmanager
def signals_held(stop, critical):
    """Finish what is in the block even if a second signal arrives meanwhile; act on it after."""
    critical.append(True)
    try:
        yield
    finally:
        critical.pop()
    if "again" in stop:
        raise Interrupted(stop["again"])


def train_loop(args, device, stop, critical, held):
    seed_everything(args.seed)
    action_rng = np.random.default_rng(args.seed)  # the uniform actions of the first --init-steps
    env_kwargs = dict(obs=args.obs, image_size=args.image_size, frame_stack=args.frame_stack,
                      action_repeat=args.action_repeat)  # fmt: skip
    env = DMCEnv(args.domain, args.task, args.seed, **env_kwargs)
    eval_env = DMCEnv(args.domain, args.task, args.seed + EVAL_SEED_OFFSET, **env_kwargs)
    obs = env.reset()  # renders once: a GL failure shows here, before the run folder exists
    if args.save_video and args.obs == "state":
        eval_env.render(8)  # a state run renders its videos: the same check
    repeat, pixels = args.action_repeat, args.obs == "pixels"
    # --buffer-size, or fewer if the run has fewer agent steps (recomputed when a resume extends
    # it: the ring then grows to what an uninterrupted run of that length would have had).
    capacity = min(args.buffer_size, env.agent_steps(args.total_steps))
    buffer = ReplayBuffer(env.frame_shape, np.uint8 if pixels else np.float32, args.frame_stack,
                          env.action_dim, capacity, env.episode_length, args.seed,
                          device)  # fmt: skip
    agent = SACAE(env.obs_shape, env.action_dim, device, args)
    run_dir, logs = args.out_dir, {}

    if args.resume:
        lock_run_folder(run_dir, held)
        loop, path = load_checkpoint(
            run_dir, args, agent, buffer, env, eval_env, action_rng, device
        )
        obs = env.observation()
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        config.update({k: getattr(args, k) for k in RESUMABLE}, device_resolved=str(device))
        with writing("config.json"), atomic_write(os.path.join(run_dir, "config.json")) as f:
            f.write(json.dumps(config, indent=2).encode())  # the next --resume sees the same run
        due = f", {loop['updates_due']} of its burst still to run" if loop["updates_due"] else ""
        print(f"[resume] {run_dir} from {os.path.basename(path)}: env step {loop['env_step']}, "
              f"agent step {loop['agent_step']}, {loop['updates']} updates{due}",
              flush=True)  # fmt: skip
    else:
        if args.load_encoder:
            agent.load_encoder(args.load_encoder)
        with writing("the run folder"):
            os.makedirs(run_dir, exist_ok=True)
            lock_run_folder(run_dir, held)
            if os.listdir(run_dir):  # another run began writing it since the flags were checked
                raise UsageError(f"--out-dir {run_dir} is no longer empty; give a new folder")
            config = {**vars(args), "device_resolved": str(device), "versions": versions(),
                      "episode_length_agent_steps": env.episode_length}  # fmt: skip
            with atomic_write(os.path.join(run_dir, "config.json")) as f:
                f.write(json.dumps(config, indent=2).encode())
        loop = {"env_step": 0, "agent_step": 0, "episode": 0, "updates": 0, "wall_time": 0.0,
                "next_eval": 0, "last_eval": -1, "next_checkpoint": args.checkpoint_freq,
                "episode_return": 0.0, "episode_env_steps": 0,
                "episode_metrics": EpisodeMetrics(device),
                "replay_saved": 0,
                # An agent step whose updates a signal interrupted: its action, updates to go.
                "pending_action": None, "updates_due": 0}  # fmt: skip
        buffer.add_first(obs)
    with writing("the run folder's logs"):
        if args.save_video:
            os.makedirs(os.path.join(run_dir, "video"), exist_ok=True)
        if agent.decoder is not None:
            os.makedirs(os.path.join(run_dir, "recon"), exist_ok=True)
        probe_fields = [f"probe_r2_{name}" for name, _ in eval_env.state_groups]
        probe_fields = ["probe_r2", *probe_fields] if pixels else []
        logs["eval.csv"] = CSVLog(os.path.join(run_dir, "eval.csv"), EVAL_FIELDS + probe_fields)
        logs["train.csv"] = CSVLog(os.path.join(run_dir, "train.csv"), TRAIN_FIELDS)
        from torch.utils.tensorboard import SummaryWriter

        # On resume, purge_step drops events logged after the checkpoint, as the CSVs are cut.
        purge_step = loop["env_step"] + 1 if args.resume else None
        tb = SummaryWriter(os.path.join(run_dir, "tb"), purge_step=purge_step)
    unlisted = "" if args.domain in ACTION_REPEAT else " (default for unlisted domains)"
    print(f"[setup] {args.domain}-{args.task} seed {args.seed} | obs {args.obs} decoder "
          f"{args.decoder} | action repeat {repeat}{unlisted} | device {device} | replay "
          f"{capacity:,} transitions, {buffer.nbytes / 2**30:.2f} GiB "
          f"({buffer.bytes_per_transition:,.0f} B each) | {run_dir}", flush=True)  # fmt: skip

    # For the ETA: an update and an environment step timed on copies, then the loop's own clocks:
    # env_clock (acting and stepping), eval_clock (evaluations), episode_clock (a training
    # episode's whole work, updates too, for its fps). Only this process's work counts.
    sec_update = time_one_update(agent, env.obs_shape, env.action_dim, args.batch_size, device)
    sec_env = time_env_steps(args, env_kwargs)
    env_clock, eval_clock, episode_clock = Clock(), Clock(), Clock()
    total_agent_steps = env.agent_steps(args.total_steps)

    def updates_to_go():
        next_step = loop["agent_step"] + (loop["pending_action"] is not None)
        return loop["updates_due"] + updates_left(
            next_step, total_agent_steps, args.init_steps, args.init_updates)  # fmt: skip

    def eta():
        """Seconds left: the updates to go, the environment steps, the evaluations."""
        steps_left = max(0, total_agent_steps - loop["agent_step"]) * repeat
        evals_left = len(range(loop["next_eval"], args.total_steps, args.eval_freq))
        evals_left += loop["last_eval"] != args.total_steps  # the final evaluation
        eval_steps = evals_left * args.eval_episodes * env.episode_length * repeat
        sec_step = env_clock.seconds / env_clock.steps if env_clock.steps else sec_env
        sec_eval_step = eval_clock.seconds / eval_clock.steps if eval_clock.steps else sec_step
        return updates_to_go() * sec_update + steps_left * sec_step + eval_steps * sec_eval_step

    gpu_job = device.type == "cpu" and updates_to_go() * sec_update > 6 * 3600
    uncompiled = " (timed uncompiled)" if args.compile else ""
    print(f"[eta] one update takes {sec_update * 1000:.0f} ms on {device}{uncompiled}, one "
          f"environment step {sec_env * 1000:.1f} ms: {updates_to_go():,} updates and "
          f"{args.total_steps - loop['env_step']:,} environment steps to go, about "
          f"{duration(eta())}" + (" -- a full pixel run is a GPU job" if gpu_job else ""),
          flush=True)  # fmt: skip
    start = time.time() - loop["wall_time"]

    def run_eval():
        step, began = loop["env_step"], time.perf_counter()
        video = os.path.join(run_dir, "video", f"eval_{step}.mp4") if args.save_video else None
        before = eval_env.state_dict()
        agent.train(False)
        with writing("an evaluation video"):
            result = evaluate(eval_env, agent, args.eval_episodes, video, probe=pixels, stop=stop)
        agent.train(True)
        if result is None:  # a signal: the checkpoint keeps this evaluation to do, from its start
            eval_env.load_state_dict(before)
            return
        returns, latents, states, sample = result
        seconds, steps = (
            time.perf_counter() - began,
            args.eval_episodes * env.episode_length * repeat,
        )
        eval_clock.add(seconds, steps)
        loop["last_eval"] = step
        loop["next_eval"] = (step // args.eval_freq + 1) * args.eval_freq
        row = {"env_step": step, "agent_step": loop["agent_step"],
               "episode_return_mean": float(np.mean(returns)),
               "episode_return_std": float(np.std(returns)),
               "episode_return_min": float(np.min(returns)),
               "episode_return_max": float(np.max(returns)),
               "episodes": len(returns), "wall_time": time.time() - start}  # fmt: skip
        with writing("eval.csv, TensorBoard events or a reconstruction image"):
            if pixels:
                row.update(linear_probe(latents, states, eval_env.state_groups))
                tb.add_scalar("eval/probe_r2", row["probe_r2"], step)
            if agent.decoder is not None and sample is not None:
                picture = reconstruction_image(sample, agent.reconstruct(sample))
                import imageio.v3 as iio

                # Encoded in memory, then written by us: a full disk fails here, in one place.
                png = iio.imwrite("<bytes>", picture, extension=".png")
                with open(os.path.join(run_dir, "recon", f"eval_{step}.png"), "wb") as f:
                    f.write(png)
                tb.add_image("eval/reconstruction", picture, step, dataformats="HWC")
            logs["eval.csv"].write(row)
            tb.add_scalar("eval/return", row["episode_return_mean"], step)
            tb.flush()
        probe = f" | probe R^2 {row['probe_r2']:.2f}" if pixels else ""
        print(f"[eval] env_step {step} (agent {loop['agent_step']}) | return "
              f"{row['episode_return_mean']:.1f} +- {row['episode_return_std']:.1f} over "
              f"{len(returns)} episodes{probe} | fps {steps / max(seconds, 1e-9):.0f} | "
              f"eta {duration(eta())}", flush=True)  # fmt: skip

    path = None
    try:
        while True:
            finished = loop["env_step"] >= args.total_steps
            if loop["env_step"] >= loop["next_eval"] or (
                finished and loop["last_eval"] != loop["env_step"]
            ):
                run_eval()
            if stop or finished or loop["env_step"] >= loop["next_checkpoint"]:
                loop["episode_metrics"].means()  # raises before a poisoned checkpoint
                every = args.checkpoint_freq
                loop["next_checkpoint"] = (loop["env_step"] // every + 1) * every
                loop["wall_time"] = time.time() - start
                with signals_held(stop, critical), writing("a checkpoint"):
                    tb.flush()
                    path = save_checkpoint(
                        run_dir, args, loop, agent, buffer, env, eval_env, action_rng, logs
                    )  # fmt: skip
            if stop:
                print(f"[stopped] checkpoint {path}; resume with: python {sys.argv[0]} "
                      f"--resume {run_dir}", flush=True)  # fmt: skip
                return 128 + stop["signum"]
            if finished:
                break

            # One agent step: act, update (a burst of --init-updates at --init-steps, then one
            # per step, as the authors' code), step the environment, store the transition.
            began, updating, step = time.perf_counter(), 0.0, loop["agent_step"]
            if loop["pending_action"] is None:  # else a resumed step with updates still due
                if step < args.init_steps:
                    action = action_rng.uniform(-1.0, 1.0, env.action_dim).astype(np.float32)
                else:
                    action = agent.act(obs)
                    loop["updates_due"] = args.init_updates if step == args.init_steps else 1
                loop["pending_action"] = action
                if loop["updates_due"] > 1:
                    print(f"[burst] {loop['updates_due']} updates at agent step {step} (authors' "
                          f"code), about {duration(loop['updates_due'] * sec_update)}",
                          flush=True)  # fmt: skip
            while loop["updates_due"] and not stop:  # a signal stops the burst within one update
                t0 = time.perf_counter()
                metrics = agent.update(buffer.sample(args.batch_size), step)
                loop["episode_metrics"].add(step, metrics)
                loop["updates_due"] -= 1
                loop["updates"] += 1
                updating += time.perf_counter() - t0
                sec_update = 0.9 * sec_update + 0.1 * (time.perf_counter() - t0)
            if stop:
                continue  # the top of the loop writes the checkpoint, the pending step included
            action, loop["pending_action"] = loop["pending_action"], None
            obs, reward, discount, done, steps = env.step(action)
            buffer.add(action, reward, discount, obs)
            loop["agent_step"] += 1
            loop["env_step"] += steps
            loop["episode_env_steps"] += steps
            loop["episode_return"] += reward
            episode_clock.add(time.perf_counter() - began, steps)
            env_clock.add(time.perf_counter() - began - updating, steps)

            if done or loop["env_step"] >= args.total_steps:
                # fps: environment steps per second of training (acting, updating, stepping) in
                # this process; evaluations and checkpoints are not counted.
                row = {"env_step": loop["env_step"], "agent_step": loop["agent_step"],
                       "episode": loop["episode"], "episode_return": loop["episode_return"],
                       "episode_length": loop["episode_env_steps"], "updates": loop["updates"],
                       "fps": episode_clock.fps, "wall_time": time.time() - start,
                       **loop["episode_metrics"].means()}  # fmt: skip
                with writing("train.csv or TensorBoard events"):
                    logs["train.csv"].write(row)
                    for tag, key in TENSORBOARD_TAGS.items():
                        if key in row:
                            tb.add_scalar(tag, row[key], loop["env_step"])
                print(f"[train] env_step {loop['env_step']} (agent {loop['agent_step']}) | "
                      f"episode {loop['episode']} | return {loop['episode_return']:.1f} | "
                      f"fps {episode_clock.fps:.1f} | eta {duration(eta())}",
                      flush=True)  # fmt: skip
                loop.update(episode=loop["episode"] + 1, episode_return=0.0, episode_env_steps=0)
                loop["episode_metrics"].clear()
                episode_clock = Clock()
                if done:
                    obs = env.reset()
                    buffer.add_first(obs)
    except NonFiniteError as e:
        if "action" in str(e):  # name the loss that went first, if one did
            try:
                loop["episode_metrics"].means()
            except NonFiniteError as first:
                e = first
        last = latest_checkpoint(run_dir) or "none yet"
        raise NonFiniteError(f"{e} (agent step {loop['agent_step']}, env step {loop['env_step']}); "
                             f"stopped without writing a checkpoint; last good checkpoint: "
                             f"{last}") from None  # fmt: skip
    except WriteError as e:
        last = latest_checkpoint(run_dir)
        how = (f"the last complete checkpoint {last} is intact: free space, then resume with "
               f"python {sys.argv[0]} --resume {run_dir}" if last else
               f"no checkpoint was written yet: free space, remove {run_dir} and start the run "
               "again")  # fmt: skip
        raise WriteError(f"{e}; {how}") from None
    finally:
        for log in logs.values():
            with contextlib.suppress(OSError):  # a full disk fails the close too; already reported
                log.close()
        with contextlib.suppress(Exception):
            tb.close()

    with signals_held(stop, critical), writing("model.pt"):
        export_model(run_dir, args, agent)
    print(f"[done] {loop['env_step']} environment steps in {duration(time.time() - start)}; "
          f"weights in {os.path.join(run_dir, 'model.pt')}; run folder {run_dir}",
          flush=True)  # fmt: skip
    return 0


# ====================================================================== flags: the manual is --help
class RenderError(RuntimeError):
    def __init__(self, cause):
        super().__init__(
            f"rendering with MUJOCO_GL={os.environ.get('MUJOCO_GL')} failed ({cause}); try "
            "MUJOCO_GL=egl (GPU or Mesa EGL), MUJOCO_GL=osmesa (apt-get install libosmesa6) or "
            "MUJOCO_GL=glfw (needs a display); --obs state runs without rendering under "
            "MUJOCO_GL=disable"
        )


class UsageError(ValueError):
    """A user mistake: reported as one line and exit status 2, before any work."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # defaults that are resolved later say so in their help
        return action.help if action.default is None else super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def checked(convert, valid, what):
    """An argparse type: convert the text; refuse what is not `valid`, saying `what` it must be."""

    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not valid(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'")
        return value

    return parse


positive_int = checked(int, lambda v: v > 0, "a positive integer")
nonnegative_int = checked(int, lambda v: v >= 0, "an integer >= 0")
seed_int = checked(
    int,
    lambda v: 0 <= v < 2**32 - EVAL_SEED_OFFSET,  # numpy's range less the eval offset
    f"an integer in [0, {2**32 - EVAL_SEED_OFFSET - 1}]",
)
bits_int = checked(int, lambda v: 1 <= v <= 8, "an integer in [1, 8]")
positive_float = checked(float, lambda v: 0 < v < math.inf, "a positive number")
nonnegative_float = checked(float, lambda v: 0 <= v < math.inf, "a number >= 0")
unit_float = checked(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")
finite_float = checked(float, math.isfinite, "a finite number")
device_name = checked(
    str, lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu, cuda or cuda:N"
)


def build_parser():
    # One flag a line or two: this is the card. (Kept so by hand; ruff leaves it.)
    # fmt: off
    p = Parser(
        prog="sac_ae.py",
        description=__doc__.split("\n\n")[0] + " Every hyperparameter "
        "defaults to the paper's and the authors' code; budgets count environment steps "
        "(agent steps x action repeat), as the paper's plots do.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("task and run")
    g.add_argument("--domain", default="cheetah", help="dm_control suite domain")
    g.add_argument("--task", default="run", help="task of that domain")
    g.add_argument("--seed", type=seed_int, default=1,
                   help="seeds python, numpy, torch and both environments")
    g.add_argument("--total-steps", type=positive_int, default=500_000,
                   help="environment steps of training")
    g.add_argument("--obs", default="pixels", choices=["pixels", "state"],
                   help="pixels: SAC+AE from images; state: SAC on proprioceptive states, no "
                   "encoder or decoder (the paper's upper baseline, SAC:state)")
    g.add_argument("--decoder", default=None, choices=["pixel", "vae", "none"],
                   help="pixel: deterministic regularized autoencoder (SAC+AE); vae: beta-VAE "
                   "with a stochastic encoder head (Sec. 4); none: no reconstruction (SAC:pixel, "
                   "the lower baseline) [default: pixel with --obs pixels]")
    g.add_argument("--device", type=device_name, default="auto",
                   help="auto, cpu, cuda or cuda:N; auto picks cuda when available. Rendering "
                   "(EGL) runs on the same GPU unless MUJOCO_EGL_DEVICE_ID says otherwise")
    g.add_argument("--out-dir", default=None,
                   help="run folder, must be new or empty [default: "
                   "runs/{domain}-{task}-s{seed}-{timestamp}]")
    g.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue that run from its latest checkpoint, with its saved "
                   "configuration; only "
                   + ", ".join("--" + k.replace("_", "-") for k in sorted(RESUMABLE))
                   + " may be given with it")
    g.add_argument("--checkpoint-freq", type=positive_int, default=None,
                   help="environment steps between checkpoints [default: --eval-freq]")
    g.add_argument("--keep-checkpoints", type=nonnegative_int, default=1,
                   help="older checkpoints kept besides the latest")
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
    g.add_argument("--save-video", action="store_true",
                   help="mp4 of the first episode of each evaluation in RUN_DIR/video")
    g = p.add_argument_group("speed")
    g.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="fp32: float32 throughout (TF32 off on GPUs); bf16: autocast the conv and "
                   "MLP work to bfloat16 (fast on CPUs with bf16 units, slow elsewhere); "
                   "parameters, losses and optimizer state stay float32")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the whole update (each variant compiled at first use, "
                   "tens of seconds on CPU) and on a GPU replay it from CUDA graphs; same maths")
    g.add_argument("--benchmark", action="store_true",
                   help="no training: time updates on a replay buffer of random frames and "
                   "environment steps, print a table and a final `benchmark ...` line")
    g.add_argument("--plot", nargs="+", default=None, metavar="EVAL_CSV",
                   help="no training: draw each eval.csv as learning_curve.png beside it (needs "
                   "matplotlib)")
    g.add_argument("--bench-updates", type=positive_int, default=20,
                   help="updates timed by --benchmark after warm-up (even: actor and targets keep "
                   "their rate)")
    g = p.add_argument_group("SAC")
    g.add_argument("--gamma", type=unit_float, default=0.99, help="discount")
    g.add_argument("--critic-lr", type=positive_float, default=1e-3,
                   help="Adam lr of the critic (and its encoder)")
    g.add_argument("--critic-beta", type=unit_float, default=0.9, help="Adam beta1 of the critic")
    g.add_argument("--critic-tau", type=unit_float, default=0.01,
                   help="soft target update rate of the Q heads")
    g.add_argument("--encoder-tau", type=unit_float, default=0.05,
                   help="soft target update rate of the target encoder")
    g.add_argument("--target-update-freq", type=positive_int, default=2,
                   help="soft target update on agent steps divisible by N (the initial burst "
                   "shares one step)")
    g.add_argument("--actor-lr", type=positive_float, default=1e-3, help="Adam lr of the actor")
    g.add_argument("--actor-beta", type=unit_float, default=0.9, help="Adam beta1 of the actor")
    g.add_argument("--actor-update-freq", type=positive_int, default=2,
                   help="actor and temperature step on agent steps divisible by N (the burst "
                   "shares one step)")
    g.add_argument("--actor-log-std-min", type=finite_float, default=-10.0,
                   help="lower bound of the policy's log std")
    g.add_argument("--actor-log-std-max", type=finite_float, default=2.0,
                   help="upper bound of the policy's log std")
    g.add_argument("--init-temperature", type=positive_float, default=0.1, help="initial alpha")
    g.add_argument("--alpha-lr", type=positive_float, default=1e-4, help="Adam lr of log alpha")
    g.add_argument("--alpha-beta", type=unit_float, default=0.5, help="Adam beta1 of log alpha")
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


# Flags that may accompany --resume: none of them changes what the run computes.
RESUMABLE = {"total_steps", "device", "checkpoint_freq", "keep_checkpoints", "save_video"}
# Flags that pick what the script does rather than configure a run: never part of a run's config.
MODES = {"resume", "out_dir", "benchmark", "bench_updates", "plot"}
# What only a training run reads: --benchmark refuses them.
TRAINING_ONLY = {"out_dir", "total_steps", "init_steps", "init_updates", "eval_freq",
                 "eval_episodes", "checkpoint_freq", "keep_checkpoints", "save_video",
                 "load_encoder", "freeze_encoder"}  # fmt: skip


def parse_args(argv=None):
    """Parse and validate everything that can be checked without building anything."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.plot:
            for path in args.plot:
                read_eval_csv(path)  # refuse a missing, empty or foreign file before drawing any
            others = set(vars(args)) - {"plot"}
            refuse_typed(argv, dict.fromkeys(others, "--plot only draws eval.csv files"))
            return args
        if args.resume:
            if args.benchmark:
                raise UsageError("--benchmark cannot be combined with --resume (it trains nothing)")
            args = resume_args(parser, argv, args.resume)
        else:
            check_device(args.device)
            render_on_training_gpu(args.device)  # before resolve_args imports dm_control
            resolve_args(args)
            unused = unused_flags(args)
            if args.benchmark:
                unused.update(dict.fromkeys(TRAINING_ONLY, "--benchmark trains nothing"))
            refuse_typed(argv, unused)
    except UsageError as e:
        parser.error(str(e))
    return args


def resume_args(parser, argv, run_dir):
    """The run's saved configuration, with the few flags that may change on resume applied."""
    dests = vars(parser.parse_args([]))
    typed = typed_flags(argv)
    given = {k: v for k, v in typed.items() if k not in MODES}
    refused = sorted(set(typed) - RESUMABLE - {"resume"})
    if refused:
        raise UsageError(
            f"--{refused[0].replace('_', '-')} cannot be given with --resume (the run keeps its "
            f"folder and configuration); allowed: "
            + ", ".join("--" + k.replace("_", "-") for k in sorted(RESUMABLE))
        )
    if not os.path.isdir(run_dir):
        raise UsageError(f"--resume {run_dir}: no such folder")
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise UsageError(
            f"--resume {run_dir}: cannot write in it (read-only filesystem or no permission)"
        )
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(
            f"--resume {run_dir}: no readable config.json, so not a run folder "
            f"({e.__class__.__name__})"
        ) from None
    missing = sorted(set(dests) - MODES - set(config))
    if missing:
        raise UsageError(
            f"--resume {run_dir}: config.json lacks {missing[0]}; was it written by another "
            "version of sac_ae.py?"
        )
    args = argparse.Namespace(**{k: config[k] for k in dests if k not in MODES})
    vars(args).update(given)
    args.resume, args.out_dir, args.benchmark, args.plot, args.bench_updates = (
        run_dir,
        run_dir,
        False,
        None,
        0,
    )
    check_device(args.device)
    render_on_training_gpu(args.device)
    found = checkpoints(run_dir)
    if not found:
        raise UsageError(
            f"--resume {run_dir}: no checkpoint in {os.path.join(run_dir, 'checkpoints')}"
        )
    if found[-1][0] >= args.total_steps + args.action_repeat:  # its last step may overshoot
        raise UsageError(
            f"--total-steps {args.total_steps}: the run is already at environment step "
            f"{found[-1][0]}; give at least that"
        )
    return args


def refuse_typed(argv, why):
    """UsageError if a flag of `why` ({dest: reason}) was typed with a value other than its
    default: it would be ignored without a word."""
    defaults = vars(build_parser().parse_args([]))
    typed = sorted(k for k, v in typed_flags(argv).items() if k in why and v != defaults[k])
    if typed:
        raise UsageError(f"--{typed[0].replace('_', '-')} has no effect: {why[typed[0]]}")


def unused_flags(args):
    """{dest: why} of the flags that this configuration never reads."""
    unused = {}
    if args.obs == "state":
        for k in ("image_size", "num_filters", "num_conv_layers", "feature_dim", "encoder_tau"):
            unused[k] = "--obs state has no conv encoder and no latent head"
    if args.decoder == "none":
        for k in ("encoder_lr", "decoder_lr", "decoder_weight_decay", "decoder_latent_lambda",
                  "ae_bits", "ae_update_freq", "vae_beta"):  # fmt: skip
            unused[k] = f"--decoder none{' (--obs state)' * (args.obs == 'state')} has no decoder"
    elif args.decoder == "pixel":
        unused["vae_beta"] = "it weights the KL term of --decoder vae"
    else:
        unused["decoder_latent_lambda"] = "--decoder vae has its KL term instead of this penalty"
    if args.freeze_encoder:
        for k in ("encoder_lr", "encoder_tau", "decoder_latent_lambda", "ae_grad"):
            unused[k] = "--freeze-encoder keeps the encoder and its latent heads fixed"
    if not args.benchmark:
        unused["bench_updates"] = "it sets how many updates --benchmark times"
    return unused


def typed_flags(argv):
    """{dest: value} of the flags typed in argv; those left at their defaults are absent."""
    parser = build_parser()
    parser.set_defaults(**{k: None for k in vars(parser.parse_args([]))})
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def check_device(name):
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name} but CUDA is not available; valid here: auto, cpu")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )


def resolve_args(args):
    """Fill the per-task defaults and refuse inconsistent input (raises UsageError)."""
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
            f"--decoder {args.decoder} needs --obs pixels (with --obs state there is no image "
            "to reconstruct)"
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
                f"--load-encoder {path}: no model.pt in it (a run writes it when it ends); give "
                "one of its checkpoints/ckpt_*.pt instead"
            )
        args.load_encoder = os.path.abspath(path)
    args.decoder = args.decoder or ("pixel" if args.obs == "pixels" else "none")
    if args.ae_grad == "separate" and args.decoder == "none":
        raise UsageError(
            "--ae-grad separate needs a decoder (pixel or vae): without one the encoder would "
            "never learn"
        )
    args.action_repeat = args.action_repeat or ACTION_REPEAT.get(args.domain, DEFAULT_REPEAT)
    args.frame_stack = args.frame_stack or (3 if args.obs == "pixels" else 1)
    args.init_updates = args.init_updates or args.init_steps
    args.checkpoint_freq = args.checkpoint_freq or args.eval_freq
    if args.benchmark and args.bench_updates % 2:
        raise UsageError(
            "--bench-updates must be even (actor and targets move every 2nd update), got "
            f"{args.bench_updates}"
        )
    if args.actor_log_std_min >= args.actor_log_std_max:
        raise UsageError("--actor-log-std-min must be below --actor-log-std-max")
    if args.obs == "pixels" and conv_output_size(args.image_size, args.num_conv_layers) < 1:
        smallest = 4 * args.num_conv_layers - 1
        raise UsageError(
            f"--image-size {args.image_size} is too small for {args.num_conv_layers} conv layers "
            f"(3x3, the first with stride 2): use at least {smallest}"
        )
    if args.benchmark:
        return args  # writes nothing: no run folder
    if args.out_dir is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        args.out_dir = os.path.join("runs", f"{args.domain}-{args.task}-s{args.seed}-{stamp}")
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
        raise UsageError(
            f"--out-dir {out_dir}: {parent} is a file, so no folder can be made under it"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(
            f"--out-dir {out_dir}: cannot write in {parent} (read-only filesystem or no permission)"
        )


# ##################################################################################################
# Tooling below: checkpoints and resume, --benchmark, --plot, main(). SAC+AE is all above.
# ##################################################################################################


# =========================================================================== checkpoints and resume
class NonFiniteError(RuntimeError):
    """A loss, action or parameter became NaN or inf."""


class WriteError(RuntimeError):
    """Writing into the run folder failed: disk full, read-only, removed."""


class Interrupted(BaseException):
    """A second SIGINT or SIGTERM: stop at once, without a checkpoint. Not an Exception (as
    KeyboardInterrupt is not), so that no handler of faults mistakes it for one."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def writing(what):
    """Turn an OSError while writing `what` into one line that names it."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        # torch.save's zip writer reports a failed write (a full disk) as a RuntimeError raised
        # while handling the OSError: the OSError says what happened.
        if type(e) is RuntimeError and isinstance(e.__context__, OSError):
            e = e.__context__
        if not isinstance(e, OSError):
            raise  # our own errors (WriteError, NonFiniteError) and other faults pass
        where = f" ({e.filename})" if e.filename else ""
        raise WriteError(f"writing {what} failed: {e.strerror or e}{where}") from None


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
        if os.path.exists(tmp):
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


CHECKPOINT_FORMAT = 2  # 2: networks saved as encoder, actor, critic, their targets, decoder


def maths_config(args):
    """The flags a checkpoint must agree on: all but those that do not change what is computed."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE | MODES}


def checkpoints(run_dir):
    """[(env_step, replay_slots, path)] of the complete checkpoints of a run, oldest first."""
    folder = os.path.join(run_dir, "checkpoints")
    found = [
        re.fullmatch(r"ckpt_(\d+)_(\d+)\.pt", name)
        for name in (os.listdir(folder) if os.path.isdir(folder) else [])
    ]
    return sorted((int(m[1]), int(m[2]), os.path.join(folder, m[0])) for m in found if m)


def latest_checkpoint(run_dir):
    found = checkpoints(run_dir)
    return found[-1][2] if found else None


def rng_states(action_rng, buffer, device):
    states = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "actions": action_rng.bit_generator.state,
        "replay": buffer.rng.bit_generator.state,
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states, action_rng, buffer, device):
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    action_rng.bit_generator.state, buffer.rng.bit_generator.state = (
        states["actions"],
        states["replay"],
    )
    if (
        "cuda" in states and device.type == "cuda"
    ):  # a run moved from CPU to GPU starts its CUDA stream fresh
        torch.cuda.set_rng_state(states["cuda"], device)


def check_parameters(agent, step):
    finite = torch.stack([torch.isfinite(p).all() for p in agent.parameters()])
    if not bool(finite.all()):
        raise NonFiniteError(f"a parameter became NaN or inf by agent step {step}")


def save_checkpoint(run_dir, args, loop, agent, buffer, env, eval_env, action_rng, logs):
    """Replay slots added since the last checkpoint, then one file with everything else."""
    check_parameters(agent, loop["agent_step"])  # never write a poisoned checkpoint
    for log in logs.values():  # the rows the checkpoint counts must be on disk before it is
        log.file.flush()
        os.fsync(log.file.fileno())
    folder = os.path.join(run_dir, "checkpoints")
    os.makedirs(folder, exist_ok=True)
    buffer.save_chunk(folder, loop["replay_saved"])
    loop["replay_saved"] = buffer.t
    payload = {
        "format": CHECKPOINT_FORMAT,
        "config": maths_config(args),
        "loop": {
            **loop,
            "episode_metrics": loop["episode_metrics"].state_dict(),
        },
        "agent": agent.state_dict(),
        "rng": rng_states(action_rng, buffer, agent.device),
        "env": env.state_dict(),
        "eval_env": eval_env.state_dict(),
        "csv_bytes": {name: log.file.tell() for name, log in logs.items()},
    }
    path = os.path.join(folder, f"ckpt_{loop['env_step']:010d}_{buffer.t:012d}.pt")
    with atomic_write(path) as f:
        torch.save(payload, f)
    kept = checkpoints(run_dir)
    for _, _, old in kept[: -(args.keep_checkpoints + 1)]:
        os.remove(old)
    oldest_slots = kept[-(args.keep_checkpoints + 1) :][0][1]
    for _, end, chunk in replay_chunks(folder):
        if end <= oldest_slots - buffer.size:  # overwritten in the ring of every kept checkpoint
            os.remove(chunk)
    return path


def load_checkpoint(run_dir, args, agent, buffer, env, eval_env, action_rng, device):
    """Restore what save_checkpoint wrote; refuse unreadable or foreign checkpoints (UsageError)."""
    found = checkpoints(run_dir)
    _, slots, path = found[-1]
    older = ", ".join(os.path.basename(p) for _, _, p in found[:-1]) or "none"
    try:
        damaged = zip_damage(path)
        if damaged:
            raise ValueError(damaged)
        payload = torch.load(
            path, map_location="cpu", weights_only=False
        )  # our own file: numpy states inside
        loop = payload["loop"]
    except Exception as e:
        raise UsageError(
            f"checkpoint {path} is unreadable ({str(e).splitlines()[0][:100]}: truncated or "
            "corrupt); "
            f"older checkpoints: {older}; move it aside to resume from an older one"
        ) from None
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(
            f"checkpoint {path} was written by another version of sac_ae.py (format "
            f"{payload.get('format')}, this one reads {CHECKPOINT_FORMAT}); it cannot continue "
            "this run"
        )
    if payload.get("config") != maths_config(args):
        theirs = payload.get("config") or {}
        diff = sorted(
            k
            for k in set(theirs) | set(maths_config(args))
            if theirs.get(k) != maths_config(args).get(k)
        )
        raise UsageError(
            f"checkpoint {path} was written by an incompatible configuration "
            f"(differs in {', '.join(diff[:3]) or 'format'}); it cannot continue this run"
        )
    for name, size in payload["csv_bytes"].items():
        if (
            not os.path.isfile(os.path.join(run_dir, name))
            or os.path.getsize(os.path.join(run_dir, name)) < size
        ):
            raise UsageError(
                f"{os.path.join(run_dir, name)} is shorter than checkpoint {path} recorded; the "
                "run folder is damaged"
            )
    # Accepted: from here on the run folder is rewound to the checkpoint.
    agent.load_state_dict(payload["agent"])
    try:
        buffer.load_chunks(os.path.join(run_dir, "checkpoints"), slots)
    except UsageError as e:
        raise UsageError(f"{e}; older checkpoints: {older}; move {path} aside to resume from "
                         "an older one") from None  # fmt: skip
    env.load_state_dict(payload["env"])
    eval_env.load_state_dict(payload["eval_env"])
    set_rng_states(payload["rng"], action_rng, buffer, device)
    for name, size in payload["csv_bytes"].items():  # drop rows written after the checkpoint
        with open(os.path.join(run_dir, name), "r+b") as f:
            f.truncate(size)
    for start, end, chunk in replay_chunks(os.path.join(run_dir, "checkpoints")):
        if end > slots:  # written after this checkpoint by the run that stopped
            os.remove(chunk)
    metrics = EpisodeMetrics(device)
    metrics.load_state_dict(loop["episode_metrics"])
    loop["episode_metrics"] = metrics
    return loop, path


def export_model(run_dir, args, agent):
    """RUN_DIR/model.pt: the trained networks alone, for torch.load(..., weights_only=True)."""
    weights = {}  # on the CPU, so that torch.load reads it on a machine without (this) GPU
    for name, net in agent.networks().items():
        weights[name] = {k: t.cpu() for k, t in net.state_dict().items()}
    with atomic_write(os.path.join(run_dir, "model.pt")) as f:
        torch.save(
            {**weights, "log_alpha": agent.log_alpha.detach().cpu(), "config": maths_config(args)},
            f,
        )


# ====================================================================================== --benchmark
def peak_resident_bytes():
    """The process's peak resident memory (Linux reports kilobytes, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


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
    capacity = min(args.buffer_size, 10 * env.episode_length)
    pixels = args.obs == "pixels"
    buffer = ReplayBuffer(
        env.frame_shape,
        np.uint8 if pixels else np.float32,
        args.frame_stack,
        env.action_dim,
        capacity,
        env.episode_length,
        seed=args.seed,
        device=device,
    )
    rng = np.random.default_rng(args.seed)

    def random_obs():
        return (
            rng.integers(0, 256, env.obs_shape, dtype=np.uint8)
            if pixels
            else rng.standard_normal(env.obs_shape).astype(np.float32)
        )

    for i in range(capacity):
        if i % env.episode_length == 0:
            buffer.add_first(random_obs())
        buffer.add(
            rng.uniform(-1, 1, env.action_dim).astype(np.float32), rng.random(), 1.0, random_obs()
        )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    warmup = 4 + (6 if args.compile else 0)
    for step in range(warmup):  # one-off costs: allocator, oneDNN/cuDNN plans, compilation
        agent.update(buffer.sample(args.batch_size), step)
    sync()
    start = time.perf_counter()
    for step in range(warmup, warmup + args.bench_updates):
        agent.update(buffer.sample(args.batch_size), step)
    sync()
    ms_update = (time.perf_counter() - start) * 1000 / args.bench_updates
    start = time.perf_counter()
    for _ in range(args.bench_updates):
        buffer.sample(args.batch_size)
    sync()
    ms_sample = (time.perf_counter() - start) * 1000 / args.bench_updates

    env.reset()
    env_steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 2.0 or env_steps < 10 * args.action_repeat:
        _, _, _, done, steps = env.step(rng.uniform(-1, 1, env.action_dim))
        env_steps += steps
        if done:
            env.reset()
    env_sps = env_steps / (time.perf_counter() - start)

    name = (
        "cpu"
        if device.type == "cpu"
        else "cuda:" + torch.cuda.get_device_name(device).replace(" ", "_")
    )
    mode = args.precision + (" + compile" if args.compile else "")
    if agent.cuda_graphs:  # how many variants replay from a CUDA graph (a capture can fail)
        captured = sum(step.graph is not None for step in agent.compiled.values())
        mode += f" + CUDA graphs ({captured} of {len(agent.compiled)} variants)"
    rows = [
        (
            "task",
            f"{args.domain}-{args.task}, obs {args.obs}, decoder {args.decoder}, "
            f"{args.image_size}px",
        ),
        ("device / precision", f"{name} / {mode}"),
        ("threads", str(torch.get_num_threads())),
        ("batch", str(args.batch_size)),
        ("ms per update (with sampling)", f"{ms_update:.1f}  over {args.bench_updates} updates"),
        ("  of which sampling", f"{ms_sample:.1f}"),
        ("updates per second", f"{1000 / ms_update:.2f}"),
        (
            "env steps per second",
            f"{env_sps:.0f}  (action repeat {args.action_repeat}, rendering included)",
        ),
        ("replay bytes per transition", f"{buffer.bytes_per_transition:,.0f}"),
        ("peak resident memory", f"{peak_resident_bytes() / 2**30:.2f} GiB"),
    ]
    if device.type == "cuda":
        rows.append(
            (
                "peak CUDA memory",
                f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB reserved",
            )
        )
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(
        f"benchmark ms_per_update={ms_update:.3f} updates_per_s={1000 / ms_update:.3f} "
        f"env_steps_per_s={env_sps:.1f} "
        f"replay_bytes_per_transition={round(buffer.bytes_per_transition)} device={name} "
        f"precision={args.precision}"
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
        try:
            with open(os.path.join(folder, "config.json")) as f:
                c = json.load(f)
            mode = (
                "SAC:state"
                if c["obs"] == "state"
                else {"pixel": "SAC+AE", "none": "SAC:pixel", "vae": "SAC+VAE"}[c["decoder"]]
            )
            title = f"{c['domain']} {c['task']}, {mode}, seed {c['seed']}, batch {c['batch_size']}"
            title += f", {c['image_size']}px" if c["obs"] == "pixels" else ""
        except (OSError, ValueError, KeyError, TypeError):
            pass
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        ax.plot(x, y, marker="o", markersize=3)
        ax.fill_between(x, y - s, y + s, alpha=0.25)
        ax.set(xlabel="environment steps", ylabel="evaluation return", title=title, ylim=(0, 1000))
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = os.path.join(folder, "learning_curve.png")
        with writing(out):
            fig.savefig(out)
        plt.close(fig)
        print(f"[plot] {out}")


# ============================================================================================= main
def out_of_memory(e):
    return isinstance(e, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError)
        and ("can't allocate memory" in str(e) or "out of memory" in str(e))
    )


def main(argv=None):
    if signal.getsignal(signal.SIGINT) is interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    args = None
    try:
        args = parse_args(argv)
        if args.plot:
            return plot(args.plot)
        return benchmark(args) if args.benchmark else train(args)
    except UsageError as e:
        print(f"sac_ae.py: error: {e}", file=sys.stderr)
        return 2
    except (RenderError, NonFiniteError, WriteError) as e:
        print(f"sac_ae.py: error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        run_dir = (
            getattr(args, "out_dir", None) if args is not None and not args.benchmark else None
        )
        folder = run_dir and os.path.isdir(run_dir)
        last = latest_checkpoint(run_dir) if folder else None
        how = f"a second {signal.Signals(signum).name}" if isinstance(e, Interrupted) else "SIGINT"
        if args is not None and args.benchmark:
            then = "--benchmark stopped"
        elif last:
            then = f"resume from the last one with: python {sys.argv[0]} --resume {run_dir}"
        elif folder:
            then = f"no checkpoint exists yet: remove {run_dir} and start the run again"
        else:
            then = "no checkpoint exists yet: start the run again"
        print(f"sac_ae.py: interrupted ({how}): stopped without writing a checkpoint; {then}",
              file=sys.stderr)  # fmt: skip
        return 128 + signum
    except Exception as e:
        if out_of_memory(e):
            print(
                f"sac_ae.py: error: out of memory ({str(e).splitlines()[0][:160]}); lower "
                "--hidden-dim, --batch-size, --image-size or --buffer-size",
                file=sys.stderr,
            )
            return 1
        if type(e).__name__ == "PhysicsError":  # dm_control's simulator diverged
            print(
                f"sac_ae.py: error: the simulation became unstable ({e}); rerun with another "
                "--seed or a lower learning rate",
                file=sys.stderr,
            )
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
