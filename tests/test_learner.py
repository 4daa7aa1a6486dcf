"""The jitted GRPO update on the real (small-preset) policy with real optax: sharding, gradient
accumulation, non-finite skipping, padding, remat, learning, and exact resume.

Compilation dominates the cost on CPU, so the tests share a few learner configs (the jit cache
is shared across Learner objects with the same config and model graph) and the 8-device
subprocess is started first and runs while the single-device tests compile.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from _learner_worker import M, flat_params, init_params, make_batch, make_policy  # noqa: E402

from vlajax.rl.checkpoint import CheckpointManager  # noqa: E402
from vlajax.rl.learner import Learner, LearnerConfig  # noqa: E402

# f32 compute so that different reduction orders (devices, micro-batches) agree tightly.
BASE = dict(compute_dtype="float32")
CFG_K4 = LearnerConfig(micro_batch_size=2, **BASE)  # 4 micro-batches of 2 on one device
CFG_K1 = LearnerConfig(micro_batch_size=8, **BASE)  # 1 micro-batch of 8


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
    """Start the 8-device worker now; the test that needs it waits for it."""
    out = tmp_path_factory.mktemp("eight")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, str(HERE / "_learner_worker.py"), "train", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE.parent)
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def params0(eight_devices):  # depends on the worker only to start it first
    return init_params()


def _params(learner) -> dict:
    return flat_params(jax.device_get(learner.params()))


def _assert_params_close(a: dict, b: dict, rtol=1e-5, atol=1e-6, scaled_atol=0.0):
    """allclose per array; scaled_atol adds scaled_atol * max|b| to atol (gradients of tiny entries)."""
    assert a.keys() == b.keys()
    for k in a:
        tol = atol + scaled_atol * float(np.max(np.abs(b[k]), initial=0.0))
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=tol, err_msg=k)


@pytest.fixture(scope="module")
def reference(params0, tmp_path_factory):
    """Three uninterrupted steps (batches 1, 2, 3) with a checkpoint written after step 2."""
    learner = Learner(make_policy(params0), CFG_K4)
    ck_dir = tmp_path_factory.mktemp("ck") / "run"
    out = {"metrics": [], "ck_dir": ck_dir}
    with CheckpointManager(ck_dir) as ck:
        for seed in (1, 2, 3):
            out["metrics"].append(jax.device_get(learner.update(make_batch(seed))))
            if seed == 2:
                out["params2"] = _params(learner)
                # async save, then the next update donates the arrays being saved
                learner.save(ck, data_state={"sampler": 2}, config={"run": "reference"})
        ck.wait_until_finished()
    out["params3"] = _params(learner)
    out["learner"] = learner
    return out


@pytest.mark.slow  # module fixture: compiles the update / three gradient steps
def test_update_metrics(reference, params0):
    m1 = reference["metrics"][0]
    for k in ("loss", "pg_loss", "clipfrac", "clipfrac_low", "clipfrac_high", "dual_clipfrac", "approx_kl_k1",
              "approx_kl_k3", "entropy", "grad_norm", "valid_tokens", "adv_mean", "adv_std", "skipped",
              "skipped_total"):
        assert np.isfinite(m1[k]), k
    batch = make_batch(1)
    assert m1["valid_tokens"] == batch["mask"].sum()
    np.testing.assert_allclose(m1["adv_mean"], np.sum(batch["advantages"][:, None] * batch["mask"]) / batch["mask"].sum(),
                               rtol=1e-5)
    assert m1["num_micro_batches"] == 4 and m1["skipped"] == 0 and m1["grad_norm"] > 0
    # first step: the policy is the rollout policy up to old_logp's noise, entropy ~ log(256)
    assert 0.9 * np.log(256) < m1["entropy"] <= np.log(256)
    assert [int(m["step"]) for m in reference["metrics"]] == [1, 2, 3]
    learner = reference["learner"]
    assert learner.step == 3 and learner.skipped == 0
    # the policy object follows the learner (rollouts see the new weights)
    q = learner.policy.state["llm"]["layers"][0]["q_proj"]["kernel"].get_value()
    np.testing.assert_array_equal(np.asarray(q), reference["params3"]["llm/layers/0/q_proj/kernel"])
    assert not np.array_equal(reference["params3"]["llm/layers/0/q_proj/kernel"],
                              np.asarray(params0["llm"]["layers"][0]["q_proj"]["kernel"]))


def test_resume_is_bit_identical(reference, params0):
    learner = Learner(make_policy(params0), CFG_K4)  # a new object, as after a restart
    with CheckpointManager(reference["ck_dir"]) as ck:
        r = learner.restore(ck)
    assert r.step == 2 and learner.step == 2 and r.data_state == {"sampler": 2}
    assert r.config["run"] == "reference" and r.config["learner"]["micro_batch_size"] == 2
    for k, v in _params(learner).items():
        np.testing.assert_array_equal(v, reference["params2"][k], err_msg=k)
    learner.update(make_batch(3))
    for k, v in _params(learner).items():
        np.testing.assert_array_equal(v, reference["params3"][k], err_msg=k)


def test_nonfinite_update_is_skipped(params0):
    learner = Learner(make_policy(params0), CFG_K4)
    learner.update(make_batch(1))
    before = jax.device_get((learner.state.params, learner.state.opt_state))
    bad = make_batch(2)
    bad["advantages"][3] = np.nan  # sample 3 has valid tokens
    assert bad["mask"][3].sum() > 0
    m = jax.device_get(learner.update(bad))
    assert m["skipped"] == 1 and m["skipped_total"] == 1 and m["step"] == 2 and not np.isfinite(m["loss"])
    after = jax.device_get((learner.state.params, learner.state.opt_state))
    jax.tree.map(np.testing.assert_array_equal, after, before)  # params AND Adam moments/count
    assert learner.skipped == 1 and learner.step == 2
    m = jax.device_get(learner.update(make_batch(2)))  # training goes on
    assert m["skipped"] == 0 and m["skipped_total"] == 1
    assert not np.array_equal(learner.state.params["llm"]["norm"]["weight"], before[0]["llm"]["norm"]["weight"])


def test_all_padding_micro_batch(params0):
    """Samples 3 and 7 are padding (micro-batch 3 of 4 holds exactly them) filled with garbage."""
    def batch(garbage: bool):
        b = make_batch(4)
        for i in (3, 7):
            b["mask"][i] = 0.0
            if garbage:
                b["pixel_values"][i] = np.nan
                b["old_logp"][i] = np.nan
                b["advantages"][i] = np.inf
                b["tokens"][i] = 255
        return b

    results = []
    for garbage in (True, False):
        learner = Learner(make_policy(params0), CFG_K4)
        m = jax.device_get(learner.update(batch(garbage)))
        assert m["skipped"] == 0 and all(np.isfinite(v) for v in m.values()), m
        assert m["valid_tokens"] == batch(False)["mask"].sum() and m["valid_samples"] == M - 2
        results.append((m, _params(learner)))
    (m1, p1), (m2, p2) = results
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    _assert_params_close(p1, p2, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def grads(params0):
    """Loss, metrics and gradients of one mini-batch of 8 under three step configurations."""
    batch = make_batch(5)
    out = {}
    for name, cfg in (("k4", CFG_K4), ("k1", CFG_K1), ("k1_no_remat", LearnerConfig(micro_batch_size=8, remat=False,
                                                                                      **BASE))):
        g, m = Learner(make_policy(params0), cfg).loss_and_grads(batch)
        out[name] = (flat_params(jax.device_get(g)), jax.device_get(m))
    return out


@pytest.mark.slow  # module fixture: compiles the update / three gradient steps
def test_gradient_accumulation(grads):
    """1 micro-batch of 8 == 4 micro-batches of 2: loss, metrics and gradients (and so the update).
    The update path with 4 micro-batches is also compared, parameter by parameter, against the
    8-device run with 1 micro-batch in test_eight_devices_match_one_device_and_restore_on_one."""
    (g4, m4), (g1, m1) = grads["k4"], grads["k1"]
    assert m4["num_micro_batches"] == 4 and m1["num_micro_batches"] == 1
    for k in ("loss", "pg_loss", "grad_norm", "clipfrac", "clipfrac_low", "clipfrac_high", "entropy", "approx_kl_k3",
              "valid_tokens", "adv_mean"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=2e-5, atol=1e-7, err_msg=k)
    _assert_params_close(g4, g1, rtol=1e-4, atol=0, scaled_atol=1e-5)
    assert max(np.abs(v).max() for v in g1.values()) > 0


def test_remat_gives_the_same_gradients(grads):
    (g_on, m_on), (g_off, m_off) = grads["k1"], grads["k1_no_remat"]
    assert m_on["loss"] == pytest.approx(m_off["loss"], rel=1e-6)
    _assert_params_close(g_on, g_off, rtol=1e-5, atol=0, scaled_atol=1e-5)


def test_positive_advantage_raises_logprob(params0):
    """Repeated updates with A > 0 on fixed sampled tokens make those tokens more likely."""
    learner = Learner(make_policy(params0), CFG_K4)
    learner.set_lr(1e-4)
    batch = make_batch(6, adv_sign=1.0)
    logp0, _ = learner.logprobs(batch)
    batch["old_logp"] = np.asarray(logp0)  # on-policy, as after the rollout
    mask = batch["mask"] > 0
    means = [float(np.asarray(logp0)[mask].mean())]
    for _ in range(4):
        m = learner.update(batch)
        assert float(m["lr"]) == pytest.approx(1e-4)
        means.append(float(np.asarray(learner.logprobs(batch)[0])[mask].mean()))
    assert all(b > a for a, b in zip(means, means[1:])), means
    assert means[-1] - means[0] > 0.05, means


def test_eight_devices_match_one_device_and_restore_on_one(eight_devices, reference, params0):
    proc, out = eight_devices
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    res = json.loads(stdout.strip().splitlines()[-1])
    # FSDP over 4 devices, batch over all 8
    assert res["q_spec"] == ["fsdp", None] and res["q_devices"] == 8  # ("embed", "qkv")
    assert res["mu_down_spec"] == [None, "fsdp"]  # Adam mu of ("mlp", "embed")
    assert res["batch_spec"] == [["data", "fsdp"], None]
    ref = reference["metrics"]
    np.testing.assert_allclose(res["loss"], [float(m["loss"]) for m in ref[:2]], rtol=1e-5)
    np.testing.assert_allclose(res["grad_norm"], [float(m["grad_norm"]) for m in ref[:2]], rtol=1e-4)
    with np.load(out / "params2.npz") as f:
        eight = dict(f)
    _assert_params_close(eight, reference["params2"], rtol=1e-4, atol=1e-6)
    # restore the 8-device checkpoint on this 1-device mesh: the values exactly, then go on
    learner = Learner(make_policy(params0), CFG_K4)
    with CheckpointManager(out / "ck") as ck:
        r = learner.restore(ck)
    assert r.step == 2 and r.data_state == {"sampler": 2}
    for k, v in _params(learner).items():
        np.testing.assert_array_equal(v, eight[k], err_msg=k)
    assert len(learner.state.params["llm"]["embed_tokens"].sharding.device_set) == 1
    learner.update(make_batch(3))
    _assert_params_close(_params(learner), reference["params3"], rtol=1e-4, atol=1e-6)


def test_even_length_attention_padding_is_exact():
    """On GPU the learner's attention pads odd sequence lengths (cuDNN rejects them under grad):
    the padded path must give the same values and gradients (checked here with XLA's kernel)."""
    from vlajax.model.layers import attention, attention_even

    r = np.random.default_rng(0)
    q, k, v = (jnp.asarray(r.normal(size=(2, 7, 4, 8)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(attention_even(q, k, v, None, "xla"), attention(q, k, v, None, "xla"), rtol=1e-5,
                               atol=1e-6)
    lengths = jnp.array([7, 4], jnp.int32)
    grad = lambda fn: jax.value_and_grad(lambda *a: jnp.sum(fn(*a, lengths, "xla") ** 2), (0, 1, 2))(q, k, v)  # noqa: E731
    (va, ga), (vb, gb) = grad(attention), grad(attention_even)
    np.testing.assert_allclose(vb, va, rtol=1e-5)
    for x, y in zip(gb, ga):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # compiles an update with the KL term and the reference forward
def test_kl_to_the_initial_policy(params0):
    """use_kl_loss with full parameters: the reference is a frozen copy of the weights the learner got,
    so the KL term is 0 at the first update and grows as the policy moves away, while the
    reference's log-probs stay those of the initial policy."""
    learner = Learner(make_policy(params0), LearnerConfig(micro_batch_size=2, kl_coef=0.5, kl_type="low_var_kl", **BASE))
    assert {x.dtype for x in jax.tree.leaves(learner.ref_params)} == {jnp.dtype(jnp.float32)}  # the compute dtype
    batch = make_batch(6, adv_sign=1.0)
    logp0 = np.asarray(learner.logprobs(batch)[0])
    np.testing.assert_array_equal(np.asarray(learner.ref_logprobs(batch)), logp0)
    learner.set_lr(1e-3)
    kls = [float(jax.device_get(learner.update(batch))["kl_loss"]) for _ in range(3)]
    assert abs(kls[0]) < 1e-7 and kls[2] > kls[1] > 1e-6, kls
    np.testing.assert_array_equal(np.asarray(learner.ref_logprobs(batch)), logp0)
    assert not np.array_equal(np.asarray(learner.logprobs(batch)[0]), logp0)
    with pytest.raises(ValueError, match="no reference policy"):
        Learner(make_policy(params0), CFG_K4).ref_logprobs(batch)
