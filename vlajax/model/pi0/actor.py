"""π0 as a policy RL can score: the flow's Euler steps made stochastic (Flow-SDE, πRL's second method),
so that every denoising step is a Gaussian with a known mean and the action chunk's log-likelihood is
the sum of the steps' log-densities.

Why Flow-SDE rather than Flow-Noise: it adds no network, so an openpi checkpoint is trained as it is,
and its log-likelihood is exact for any noise level. Each step from t to t + dt (dt = -1/K, t from 1)
is

    x' = x + [v + s^2 / (2t) (x + (1 - t) v)] dt + s sqrt(|dt|) eps,    eps ~ N(0, I)

with v the velocity at (x, t) and s = noise_level x temperature: the reverse SDE whose marginals are
the flow's (the score of x_t = t eps + (1 - t) x_0 is -(x + (1 - t) v) / t), which is the ODE again at
s = 0 (greedy decoding). The rollout keeps the whole chain x_K .. x_0 (`sample_shape`); the learner
recomputes each step's mean under the current parameters. Only the elements the simulator executes
(the first `chunk` actions, the first `action_dim` dims) are scored: T = chunk x action_dim
log-probs per call, in the rollout's layout, each summed over the K steps.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from vlajax.model.pi0.config import Pi0Config
from vlajax.model.pi0.model import Pi0, make_attn_mask

__all__ = ["Pi0Actor", "Pi0ActorConfig"]


@dataclasses.dataclass(frozen=True)
class Pi0ActorConfig:
    """The π0 model and how a run uses it: `chunk` actions of `action_dim` dims executed per call (the
    model's horizon and width may be larger: openpi pads to 32 dims), `num_steps` denoising steps.
    Greedy decoding (temperature 0): `greedy_chain` "ode" runs the flow's ODE (openpi's sampler,
    right for a flow-matching checkpoint), "mean" takes each Flow-SDE step's mean at `noise_level`
    without its noise (the most likely next state at every step: the greedy chain of the stochastic
    policy RL trains, which from scratch is no longer a flow whose ODE means anything);
    `greedy_from_noise` starts it from a fresh N(0, I) draw, as openpi does, or (False) from 0, the
    prior's mode, so that greedy is deterministic."""

    model: Pi0Config
    chunk: int
    action_dim: int
    proprio_dim: int | None = None
    num_steps: int = 10
    noise_level: float = 0.5
    greedy_from_noise: bool = True
    greedy_chain: str = "ode"

    def __post_init__(self):
        m = self.model
        if self.chunk > m.action_horizon or self.action_dim > m.action_dim:
            raise ValueError(f"π0 makes {m.action_horizon} actions of {m.action_dim} dims per call; the run executes "
                             f"{self.chunk} of {self.action_dim}")
        if self.greedy_chain not in ("ode", "mean"):
            raise ValueError(f"greedy_chain must be 'ode' or 'mean', got {self.greedy_chain!r}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 Euler steps, got {self.num_steps}")
        if not self.noise_level > 0:
            raise ValueError(f"noise_level must be > 0 (Flow-SDE needs noise to score a chain), got {self.noise_level}")
        if self.proprio_dim and self.proprio_dim > m.action_dim:
            raise ValueError(f"the robot state has {self.proprio_dim} dims, more than π0's {m.action_dim}")

    sample_dtype = "float32"

    @property
    def num_action_tokens(self) -> int:
        return self.chunk * self.action_dim

    @property
    def num_images(self) -> int:
        return self.model.num_images

    @property
    def image_size(self) -> int:
        return self.model.vision.image_size

    @property
    def sample_shape(self) -> tuple[int, int]:
        """The denoising chain x_K .. x_0, each (action_horizon x model action_dim) flat."""
        return (self.num_steps + 1, self.model.action_horizon * self.model.action_dim)


class Pi0Actor(nnx.Module):
    """`vlajax.model.family.ActionModel` over `Pi0` (module docstring)."""

    # LoRA's default targets: every projection of both Gemma experts (openpi's gemma_*_lora: attn + ffn)
    LORA_TARGETS = r"pi0\.llm\.layers\.\d+\.\d+\.(q|kv|o|gate|up|down)_proj"

    def __init__(self, cfg: Pi0ActorConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.pi0 = Pi0(cfg.model, rngs)

    def preprocess_images(self, images, *, flip: bool, center_crop: bool = False, crop_offsets=None):
        """uint8 (B, n_img, H, W, 3) -> float32 in [-1, 1] at the tower's size (bilinear; openpi's own
        resize pads to keep the aspect ratio, the same for square frames). No crop: π0 has none at
        inference."""
        if crop_offsets is not None:
            raise ValueError("π0 has no crop augmentation (crop_offsets)")
        x = images[:, :, ::-1, ::-1] if flip else images
        s = self.cfg.image_size
        x = x.astype(jnp.float32)
        if x.shape[2:4] != (s, s):
            x = jax.image.resize(x, (*x.shape[:2], s, s, 3), "bilinear")
        return x / 127.5 - 1.0

    def _observation(self, pixel_values, input_ids, attention_mask, proprio):
        b = pixel_values.shape[0]
        masks = jnp.ones((b, pixel_values.shape[1]), bool)
        a = self.cfg.model.action_dim
        state = jnp.zeros((b, a), jnp.float32) if proprio is None else jnp.pad(
            proprio.astype(jnp.float32), ((0, 0), (0, a - proprio.shape[-1])))
        return (pixel_values, masks, input_ids, attention_mask > 0), state

    def _prefix_cache(self, obs, dtype):
        p_tok, p_valid, p_ar = self.pi0.embed_prefix(*obs, dtype=dtype)
        positions = jnp.cumsum(p_valid, axis=1) - 1
        _, cache = self.pi0.llm([p_tok, None], positions, make_attn_mask(p_valid, p_ar), dtype=dtype)
        return p_valid, cache

    def _velocity(self, pi0, p_valid, cache, state, x_t, t, dtype):
        """(B, H, A) velocity of the suffix at (x_t, t), the prefix given by its keys and values."""
        b = x_t.shape[0]
        s_tok, s_valid, s_ar = pi0.embed_suffix(state, x_t, jnp.broadcast_to(t, (b,)), dtype)
        to_prefix = jnp.broadcast_to(p_valid[:, None, :], (b, s_tok.shape[1], p_valid.shape[1]))
        mask = jnp.concatenate([to_prefix, make_attn_mask(s_valid, s_ar)], axis=-1)
        pos = jnp.sum(p_valid, axis=-1)[:, None] + jnp.cumsum(s_valid, axis=-1) - 1
        (_, out), _ = pi0.llm([None, s_tok], pos, mask, kv_cache=cache, dtype=dtype)
        return pi0.action_out_proj(out[:, -self.cfg.model.action_horizon:], dtype).astype(jnp.float32)

    def _step_mean(self, x, v, t, sigma, dt):
        return x + dt * (v + (sigma ** 2 / (2 * t)) * (x + (1 - t) * v))

    def _executed(self, x):
        """(B, H, A) -> (B, chunk x action_dim): the elements the simulator runs, step-major."""
        return x[:, :self.cfg.chunk, :self.cfg.action_dim].reshape(x.shape[0], -1)

    def _logp(self, x_next, mean, scale):
        z = (x_next - mean) / scale
        return self._executed(-0.5 * jnp.square(z) - math.log(scale) - 0.5 * math.log(2 * math.pi))

    def _scan_steps(self, step, carry, xs):
        """`lax.scan` of `step(pi0, carry, x) -> (carry, y)` over the denoising steps: the expert's blocks
        compile once, not num_steps times (the unrolled 3B update compiled for 8 min). The model is
        split outside and merged, as copies, inside the body: an nnx Variable may only be updated in the
        trace it was made in (the learner's per-block `nnx.remat` updates them: TraceContextError)."""
        graphdef, state = nnx.split(self.pi0)
        return jax.lax.scan(lambda cy, x: step(nnx.merge(graphdef, state, copy=True), cy, x), carry, xs)

    def sample_actions(self, pixel_values, input_ids, attention_mask, proprio, keys, *, temperature: float,
                       dtype=jnp.float32):
        """(chain (B, K + 1, H x A) float32, log-probs (B, chunk x action_dim)); greedy (temperature 0)
        runs `greedy_chain` (class docstring) and gives log-probs 0 (no density to score)."""
        c, m = self.cfg, self.cfg.model
        obs, state = self._observation(pixel_values, input_ids, attention_mask, proprio)
        p_valid, cache = self._prefix_cache(obs, dtype)
        b, shape = pixel_values.shape[0], (m.action_horizon, m.action_dim)
        draws = jax.vmap(lambda k: jax.random.normal(k, (c.num_steps + 1, *shape)))(keys)  # (B, K + 1, H, A)
        if temperature:
            sigma = c.noise_level * temperature
        else:  # greedy: the ODE, or the steps' means at the trained noise level
            sigma = c.noise_level if c.greedy_chain == "mean" else 0.0
        dt = -1.0 / c.num_steps
        scale = sigma * math.sqrt(-dt)
        x = draws[:, 0] if temperature or c.greedy_from_noise else jnp.zeros_like(draws[:, 0])

        def step(pi0, carry, xs):
            x, logp = carry
            t, eps = xs
            mean = self._step_mean(x, self._velocity(pi0, p_valid, cache, state, x, t, dtype), t, sigma, dt)
            if not temperature:
                return (mean, logp), mean
            x = mean + scale * eps
            return (x, logp + self._logp(x, mean, scale)), x

        ts = 1.0 + dt * jnp.arange(c.num_steps, dtype=jnp.float32)
        (_, logp), xs = self._scan_steps(step, (x, jnp.zeros((b, c.num_action_tokens), jnp.float32)),
                                         (ts, jnp.moveaxis(draws[:, 1:], 1, 0)))
        chain = jnp.concatenate([x[:, None], jnp.moveaxis(xs, 0, 1)], axis=1)
        return chain.reshape(b, c.num_steps + 1, -1), logp

    def log_prob(self, pixel_values, input_ids, attention_mask, proprio, samples, *, temperature: float,
                 dtype=jnp.float32):
        """(logp, entropy, mode), each (B, chunk x action_dim): the chain's step log-densities under the
        current parameters, summed over steps; the Gaussian steps' entropy; the chain's end."""
        c, m = self.cfg, self.cfg.model
        b = samples.shape[0]
        chain = samples.reshape(b, c.num_steps + 1, m.action_horizon, m.action_dim).astype(jnp.float32)
        obs, state = self._observation(pixel_values, input_ids, attention_mask, proprio)
        p_valid, cache = self._prefix_cache(obs, dtype)
        sigma, dt = c.noise_level * temperature, -1.0 / c.num_steps
        scale = sigma * math.sqrt(-dt)

        def step(pi0, logp, xs):
            t, x, x_next = xs
            mean = self._step_mean(x, self._velocity(pi0, p_valid, cache, state, x, t, dtype), t, sigma, dt)
            return logp + self._logp(x_next, mean, scale), None

        ts = 1.0 + dt * jnp.arange(c.num_steps, dtype=jnp.float32)
        steps = jnp.moveaxis(chain, 1, 0)
        logp, _ = self._scan_steps(step, jnp.zeros((b, c.num_action_tokens), jnp.float32),
                                   (ts, steps[:-1], steps[1:]))
        entropy = jnp.full_like(logp, c.num_steps * (0.5 + 0.5 * math.log(2 * math.pi) + math.log(scale)))
        return logp, entropy, self._executed(chain[:, -1])
