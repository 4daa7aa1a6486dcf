"""How fast can the small policy learn the tabletop mapping at all? Supervised behaviour cloning of the
scripted (directed) policy, as a ceiling for what GRPO from a binary reward can do in the same model.

Labels are the directed policy's dx, dy (`vlajax.envs.tabletop.directed_actions`) toward one of three
targets: `block` (the named block, wherever it is: vision + language), `anchor` (the named block's home
spot of `tabletop_anchored`: language + gripper position) or `center` (the table centre: gripper position
only). The gripper starts at the layout's start plus 0-3 random chunks. Loss: cross-entropy of the
labelled bins at the rollout temperature (1.6) on the dx, dy tokens; every `--every` steps the greedy
sign accuracy of dx, dy on 64 held-out states is printed (0.5 = chance).

    PYTHONPATH=. python benchmarks/probe_tabletop_bc.py --target center --proprio --image-size 56
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from vlajax.envs.tabletop import ANCHORS, PROPRIO_HIGH, PROPRIO_LOW, TabletopEnv, directed_actions  # noqa: E402
from vlajax.model.oft import build_model, preset  # noqa: E402
from vlajax.model.oft.actions import BIN_CENTERS  # noqa: E402
from vlajax.model.oft.init import apply_init  # noqa: E402
from vlajax.model.preprocess import normalize_proprio, preprocess_images  # noqa: E402
from vlajax.model.tokenizer import load_tokenizer  # noqa: E402

XY = (np.arange(56) % 7) < 2  # the dx, dy tokens of the 8 x 7 chunk


def columns(a: np.ndarray) -> np.ndarray:
    """Normalised actions -> logit columns (nearest bin; column = 255 - bin)."""
    return (255 - np.abs(BIN_CENTERS[None] - a.reshape(-1, 1)).argmin(-1)).reshape(a.shape)


def make_batch(env, tok, rng, n: int, state0: int, target: str):
    imgs, pros, instrs, cols = [], [], [], []
    for i in range(n):
        task = int(rng.integers(3))
        out = env.reset(task, state0 + i, 0)
        for _ in range(rng.integers(0, 4)):
            wander = np.zeros((8, 7))
            wander[:, :2], wander[:, 6] = rng.uniform(-1, 1, (8, 2)), -1
            out = env.chunk_step(wander)
        st = env.state()
        goal = {"block": st["target"], "anchor": ANCHORS[task], "center": np.zeros(2)}[target]
        imgs.append(out.images["agentview"])
        pros.append(out.proprio)
        instrs.append(out.instruction)
        cols.append(columns(directed_actions(st["gripper"][:2], goal, 8)).reshape(-1))
    ids, mask = tok.encode(instrs)
    return np.stack(imgs), np.stack(pros), ids, mask, np.stack(cols).astype(np.int32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", choices=["block", "anchor", "center"], default="block")
    ap.add_argument("--suite-jitter", type=float, default=None, help="block_jitter of the layout (anchored: 0.03)")
    ap.add_argument("--proprio", action="store_true", help="feed the gripper state as the proprio token")
    ap.add_argument("--image-size", type=int, default=56)
    ap.add_argument("--action-queries", action="store_true", help="learned embeddings at the action rows")
    ap.add_argument("--raw-proprio", action="store_true", help="feed the raw state (default: normalised to [-1, 1] "
                    "by the env's PROPRIO_LOW / HIGH, as training does)")
    ap.add_argument("--init", default="scratch", choices=["normal", "scratch"])
    ap.add_argument("--llm-layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--every", type=int, default=20)
    args = ap.parse_args()

    env = TabletopEnv(64, block_jitter=args.suite_jitter)
    tok = load_tokenizer("tiny")
    cfg = preset("small", image_size=args.image_size, proprio_dim=8 if args.proprio else None,
                 action_queries=args.action_queries)
    cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, num_layers=args.llm_layers, hidden=args.hidden,
                                                           intermediate=2 * args.hidden))
    model = build_model(cfg, seed=0)
    apply_init(model, args.init)
    graphdef, state = nnx.split(model)
    tx = optax.adam(args.lr)
    opt = tx.init(state)

    def loss_fn(state, imgs, pro, ids, mask, cols):
        m = nnx.merge(graphdef, state)
        pv = preprocess_images(imgs, flip=False, center_crop=True, resize_to=args.image_size)
        if args.proprio and not args.raw_proprio:
            pro = normalize_proprio(pro, PROPRIO_LOW, PROPRIO_HIGH)
        logits = m.action_logits(pv, ids, mask, pro if args.proprio else None, dtype=jnp.float32)
        ll = jnp.take_along_axis(jax.nn.log_softmax(logits / 1.6, -1), cols[..., None], -1)[..., 0]
        return -jnp.mean(ll[:, XY]), logits

    @jax.jit
    def step(state, opt, *b):
        (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(state, *b)
        u, opt = tx.update(g, opt, state)
        return optax.apply_updates(state, u), opt, loss

    greedy = jax.jit(lambda state, *b: jnp.argmax(loss_fn(state, *b)[1], -1))
    rng = np.random.default_rng(0)
    test = make_batch(env, tok, rng, 64, 100_000, args.target)
    want = BIN_CENTERS[np.clip(255 - test[4], 0, 254)][:, XY]
    t0 = time.perf_counter()
    print(f"target={args.target} proprio={args.proprio} image={args.image_size} init={args.init} "
          f"queries={args.action_queries} raw_proprio={args.raw_proprio} layers={args.llm_layers} hidden={args.hidden} lr={args.lr} batch={args.batch}")
    for it in range(args.steps):
        state, opt, loss = step(state, opt, *make_batch(env, tok, rng, args.batch, it * args.batch, args.target))
        if it % args.every == 0 or it == args.steps - 1:
            got = BIN_CENTERS[np.clip(255 - np.asarray(greedy(state, *test)), 0, 254)][:, XY]
            acc = float(np.mean(np.sign(got) == np.sign(want)))
            print(f"step {it:4d}  loss {float(loss):.3f}  sign accuracy {acc:.3f}  ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    env.close()


if __name__ == "__main__":
    main()
