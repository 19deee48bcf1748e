"""Parity with PyTorch: `adder` computes the numbers the original recipe computes.

The reference is ``experiments/torch_reference.py`` (plain PyTorch: Conv2d,
BatchNorm2d, CrossEntropyLoss, SGD, OneCycleLR, AveragedModel, update_bn).
Both sides start from the same weights (`adder.convert`) and see the same
batches, on the CPU, on fake MNIST-like data (no dataset needed). Everything
is float32 except the 50-step run of test 6, which is float64 for the reason
its docstring gives. torch is a test dependency: without it this module
fails, it does not skip. Run these tests alone with ``pytest -k parity``.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import pathlib
import sys
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from torch.optim.lr_scheduler import OneCycleLR
from torch.optim.swa_utils import AveragedModel, update_bn

from adder import batch_norm
from adder import convert
from adder import model as model_lib
from adder import optim
from adder import step as step_lib
from adder.config import Config


def _load_reference():
  path = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "torch_reference.py"
  spec = importlib.util.spec_from_file_location("torch_reference", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up here
  spec.loader.exec_module(module)
  return module


ref = _load_reference()

CONFIG = Config().without_augmentation()  # the PyTorch reference's recipe
MODEL = model_lib.create_model(CONFIG)


# --- fake data and shared set-up -------------------------------------------------


def _prototypes() -> np.ndarray:
  """Ten fixed 'digits': sparse bright strokes in the central 20x20, uint8 (10, 28, 28)."""
  rng = np.random.default_rng(1234)
  protos = np.zeros((10, 28, 28), np.uint8)
  mask = rng.random((10, 20, 20)) < 0.3
  protos[:, 4:24, 4:24] = np.where(mask, rng.integers(100, 256, (10, 20, 20)), 0)
  return protos


PROTOTYPES = _prototypes()


def fake_digits(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
  """MNIST-like (images uint8 (n, 28, 28), labels int32 (n,)), learnable.

  Each image is its label's prototype shifted by up to 2 pixels with 10% of
  the pixels dropped: pixel statistics close to MNIST's, and classes a small
  network separates within a few dozen steps (so predictions are not ties).
  """
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, n).astype(np.int32)
  images = np.empty((n, 28, 28), np.uint8)
  for i, label in enumerate(labels):
    dy, dx = rng.integers(-2, 3, 2)
    images[i] = np.roll(PROTOTYPES[label], (dy, dx), axis=(0, 1))
  images *= (rng.random(images.shape) >= 0.1).astype(np.uint8)
  return images, labels


def torch_init_variables(seed: int) -> dict:
  """AdderNet variables converted from PyTorch's own initialisation (no JAX compile)."""
  torch.manual_seed(seed)
  return convert.torch_state_dict_to_flax(ref.TorchAdderNet(CONFIG).state_dict())


def random_variables(seed: int) -> dict:
  """Variables with non-trivial BatchNorm parameters and running statistics."""
  variables = torch_init_variables(seed)
  rng = np.random.default_rng(seed)
  for name in variables["batch_stats"]:
    c = variables["params"][name]["scale"].shape
    variables["params"][name] = {
        "scale": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "bias": rng.normal(0.0, 0.1, c).astype(np.float32)}
    variables["batch_stats"][name] = {
        "mean": rng.normal(0.0, 0.2, c).astype(np.float32),
        "var": rng.uniform(0.5, 2.0, c).astype(np.float32)}
  return variables


def torch_model(variables: dict) -> ref.TorchAdderNet:
  model = ref.TorchAdderNet(CONFIG)
  model.load_state_dict(
      {k: torch.from_numpy(v) for k, v in convert.flax_to_torch_state_dict(variables).items()})
  return model


def torch_variables(model: torch.nn.Module) -> dict:
  return convert.torch_state_dict_to_flax(model.state_dict())


def torch_inputs(images_u8: np.ndarray, numbers: np.ndarray):
  return ref.normalize_images(torch.from_numpy(images_u8)), torch.from_numpy(
      np.asarray(numbers, np.int64))


def torch_predict(model: torch.nn.Module, images_u8: np.ndarray, numbers: np.ndarray):
  model.eval()
  with torch.no_grad():
    digit_logits, sum_logits = model(torch_inputs(images_u8, numbers))
  return digit_logits.argmax(1).numpy(), sum_logits.argmax(1).numpy()


# Jitted once per module and shared by the tests (same shapes where possible):
# compiling dominates the run time of this file.


@functools.partial(jax.jit, static_argnames="train")
def forward(variables, images_u8, numbers, train: bool):
  """AdderNet logits (train mode: with batch statistics) for uint8 images."""
  logits, _ = MODEL.apply(variables, model_lib.normalize_images(images_u8), numbers,
                          train=train, mutable=["batch_stats"])
  return logits


def jax_predict(variables, images_u8, numbers):
  digit_logits, sum_logits = forward(variables, images_u8, numbers, train=False)
  return np.argmax(digit_logits, -1), np.argmax(sum_logits, -1)


@functools.partial(jax.jit, static_argnames="consistency_weight")
def jax_loss_and_grads(variables, images_u8, digits, numbers, consistency_weight=0.0):
  """`train_step`'s objective and its gradients, through a TrainState of that weight."""
  state = make_train_state(variables, RUN_TX, consistency_weight)
  batch = step_lib.make_batch(images_u8, digits, jnp.arange(len(digits)), numbers)
  return jax.value_and_grad(lambda params: step_lib.objective(state, params, batch)[0])(
      state.params)


TRAIN_STEP = jax.jit(step_lib.train_step)
RECOMPUTE_BATCH_STATS = jax.jit(functools.partial(batch_norm.recompute_batch_stats, MODEL))

# The real recipe over one epoch of 50 steps: the whole OneCycleLR, averaging
# from step round(0.75 * 50) = 38. Tests 3 and 5 share it and TRAIN_STEP's
# compilation (batches of 32); test 6 runs it in float64.
STEPS, BATCH = 50, 32
RUN_CONFIG = CONFIG.replace(epochs=1, batch_size=BATCH, swa=True)
RUN_TX, _ = optim.create_optimizer(RUN_CONFIG, STEPS)
NUM_TRAIN = 512  # fake training set; update_bn passes: 16 batches of 32, in order


def make_train_state(variables: dict, tx: optax.GradientTransformation,
                     consistency_weight: float = CONFIG.consistency_weight
                     ) -> step_lib.TrainState:
  return step_lib.TrainState.create(
      apply_fn=MODEL.apply, params=jax.tree_util.tree_map(jnp.asarray, variables["params"]),
      batch_stats=jax.tree_util.tree_map(jnp.asarray, variables["batch_stats"]), tx=tx,
      consistency_weight=consistency_weight)


def max_abs_diff(a, b) -> float:
  diffs = jax.tree_util.tree_map(
      lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
  return max(jax.tree_util.tree_leaves(diffs))


def assert_close_abs_or_rel(actual, expected, *, atol: float, rtol: float):
  """Every element within `atol` absolutely OR within `rtol` relatively."""
  chex.assert_trees_all_equal_shapes(actual, expected)

  def check(path, a, e):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    err = np.abs(a - e)
    bad = (err > atol) & (err > rtol * np.abs(e))
    assert not bad.any(), (
        f"{jax.tree_util.keystr(path)}: {bad.sum()} of {bad.size} elements differ by "
        f"more than {atol} absolute and {rtol} relative (max abs {err.max():.3g})")

  jax.tree_util.tree_map_with_path(check, actual, expected)


# --- conversion ----------------------------------------------------------------


def test_parity_convert_round_trip_is_exact():
  torch.manual_seed(0)
  model = ref.TorchAdderNet(CONFIG)
  with torch.no_grad():  # non-default statistics and a count, so nothing passes by luck
    for name, buf in model.named_buffers():
      if name.endswith("running_mean"):
        buf.normal_()
      elif name.endswith("running_var"):
        buf.uniform_(0.5, 2.0)
      else:
        buf.fill_(7)
  state_dict = model.state_dict()

  variables = convert.torch_state_dict_to_flax(state_dict)
  # Exactly the structure, shapes and dtypes AdderNet declares.
  template = jax.eval_shape(
      functools.partial(model_lib.init_variables, MODEL), jax.random.PRNGKey(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(variables, template)
  assert model_lib.count_params(variables["params"]) == sum(
      p.numel() for p in model.parameters()) == 17_393

  back = convert.flax_to_torch_state_dict(variables, num_batches_tracked=7)
  assert list(back) == list(state_dict)
  for key, value in state_dict.items():
    np.testing.assert_array_equal(back[key], value.numpy(), err_msg=key)
    assert back[key].dtype == value.numpy().dtype, key
  chex.assert_trees_all_equal(convert.torch_state_dict_to_flax(back), variables)
  # Flax -> PyTorch -> Flax from JAX arrays too, and the result loads strictly.
  chex.assert_trees_all_equal(
      convert.torch_state_dict_to_flax(
          convert.flax_to_torch_state_dict(jax.tree_util.tree_map(jnp.asarray, variables))),
      variables)
  model.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
  assert model.bn0.momentum == convert.torch_bn_momentum(CONFIG.bn_momentum) == 0.1
  assert model.bn0.eps == CONFIG.bn_epsilon


# --- 1. forward ----------------------------------------------------------------


def test_parity_forward_eval_and_train_mode():
  variables = random_variables(0)
  images, _ = fake_digits(0, 64)
  numbers = np.random.default_rng(0).integers(0, 10, 64).astype(np.int32)
  model = torch_model(variables)

  for train in (False, True):  # running statistics, then batch statistics
    logits = forward(variables, images, numbers, train=train)
    model.train(train)
    with torch.no_grad():
      torch_logits = model(torch_inputs(images, numbers))
    chex.assert_trees_all_close(
        logits, tuple(t.numpy() for t in torch_logits), atol=1e-5, rtol=0.0,
        custom_message=f"train={train}")


# --- 2. loss and gradients -----------------------------------------------------


def torch_loss_and_grads(variables, images_u8, digits, numbers, dtype=torch.float32,
                         consistency_weight=0.0):
  model = torch_model(variables).to(dtype).train()
  images, t_numbers = torch_inputs(images_u8, numbers)
  digit_logits, sum_logits = model((images.to(dtype), t_numbers))
  t_digits = torch.from_numpy(digits.astype(np.int64))
  loss = ref.loss_fn(digit_logits, sum_logits, t_digits, t_digits + t_numbers,
                     consistency_weight)
  loss.backward()
  grads = {name: p.grad.to(torch.float32) for name, p in model.named_parameters()}
  return loss.item(), convert.torch_state_dict_to_flax(grads)["params"]


@pytest.mark.parametrize("weight", [0.0, 0.7])  # the cross-entropies; with the consistency term
def test_parity_loss_and_every_gradient(weight):
  # A batch of 8: PyTorch's own float32 conv-weight gradients (oneDNN, CPU)
  # carry rounding errors that grow with the batch (1.6e-5 against float64 at
  # a batch of 64, where JAX's are 1e-6); the float64 check below covers 64.
  variables = random_variables(1)
  images, digits = fake_digits(1, 8)
  numbers = np.random.default_rng(1).integers(0, 10, 8).astype(np.int32)

  loss, grads = jax_loss_and_grads(variables, images, digits, numbers, weight)
  t_loss, t_grads = torch_loss_and_grads(variables, images, digits, numbers,
                                         consistency_weight=weight)
  chex.assert_trees_all_close(loss, t_loss, atol=1e-5, rtol=0.0)
  assert_close_abs_or_rel(grads, t_grads, atol=1e-5, rtol=1e-4)

  # A batch of 64 against PyTorch in float64: JAX's float32 gradients are right.
  images, digits = fake_digits(11, 64)
  numbers = np.random.default_rng(11).integers(0, 10, 64).astype(np.int32)
  loss, grads = jax_loss_and_grads(variables, images, digits, numbers, weight)
  t_loss, t_grads = torch_loss_and_grads(variables, images, digits, numbers, torch.float64,
                                         weight)
  chex.assert_trees_all_close(loss, t_loss, atol=1e-5, rtol=0.0)
  assert_close_abs_or_rel(grads, t_grads, atol=1e-5, rtol=1e-4)


# --- 3. BatchNorm running statistics --------------------------------------------


def test_parity_batchnorm_running_stats_after_a_step():
  variables = random_variables(2)
  images, digits = fake_digits(2, BATCH)
  numbers = np.random.default_rng(2).integers(0, 10, BATCH).astype(np.int32)

  state = make_train_state(variables, RUN_TX)
  state, _ = TRAIN_STEP(state, step_lib.make_batch(images, digits, np.arange(BATCH), numbers))

  run = ref.create_run(RUN_CONFIG, STEPS, state_dict=convert.flax_to_torch_state_dict(variables))
  t_images, t_numbers = torch_inputs(images, numbers)
  t_digits = torch.from_numpy(digits.astype(np.int64))
  ref.train_step(run, t_images, t_numbers, t_digits, t_digits + t_numbers)

  assert int(run.model.bn0.num_batches_tracked) == 1
  chex.assert_trees_all_close(
      state.batch_stats, torch_variables(run.model)["batch_stats"], atol=1e-5, rtol=0.0)
  # The statistics moved: a test that passes on the initial values proves nothing.
  assert max_abs_diff(state.batch_stats, variables["batch_stats"]) > 1e-2


# --- 4. the one-cycle schedule -------------------------------------------------


def torch_onecycle(total_steps: int, config: Config) -> tuple[np.ndarray, np.ndarray]:
  """(lr, momentum) float64 (total_steps,) that OneCycleLR gives each optimizer.step()."""
  param = torch.nn.Parameter(torch.zeros(1))
  opt = torch.optim.SGD([param], lr=config.lr, momentum=config.max_momentum)
  sched = OneCycleLR(
      opt, max_lr=config.lr, total_steps=total_steps, pct_start=config.pct_start,
      anneal_strategy="cos", cycle_momentum=True, base_momentum=config.base_momentum,
      max_momentum=config.max_momentum, div_factor=config.div_factor,
      final_div_factor=config.final_div_factor)
  lrs, moms = [], []
  for _ in range(total_steps):
    lrs.append(opt.param_groups[0]["lr"])
    moms.append(opt.param_groups[0]["momentum"])
    opt.step()  # no gradient: a no-op, keeps the scheduler's call-order check quiet
    sched.step()
  return np.asarray(lrs), np.asarray(moms)


def optimizer_hyperparams(config: Config, steps: int) -> tuple[jax.Array, jax.Array]:
  """(lr, momentum) that `create_optimizer`'s SGD actually applies at each update."""
  tx, _ = optim.create_optimizer(config, steps)  # one epoch of `steps` steps
  params = {"w": jnp.zeros(3)}

  def body(opt_state, _):
    _, opt_state = tx.update({"w": jnp.ones(3)}, opt_state, params)
    hp = opt_state[0].hyperparams  # those used by the update just made
    return opt_state, (hp["learning_rate"], hp["momentum"])

  _, (lrs, moms) = jax.lax.scan(body, tx.init(params), None, length=steps)
  return lrs, moms


# float32 against PyTorch's float64, at every step: equal to float32 rounding.
SCHEDULE_TOL = dict(rtol=1e-6, atol=0.0)


@pytest.mark.parametrize("total_steps", [1000, 1003, 50, 7])
def test_parity_onecycle_schedule_every_step(total_steps):
  config = CONFIG.replace(epochs=1)
  t_lr, t_mom = torch_onecycle(total_steps, config)
  lr_fn, momentum_fn = optim.onecycle_schedules(
      total_steps, config.lr, pct_start=config.pct_start, div_factor=config.div_factor,
      final_div_factor=config.final_div_factor, base_momentum=config.base_momentum,
      max_momentum=config.max_momentum)
  steps = jnp.arange(total_steps)
  lr, mom = lr_fn(steps), momentum_fn(steps)
  chex.assert_trees_all_close(lr, t_lr.astype(np.float32), **SCHEDULE_TOL)
  chex.assert_trees_all_close(mom, t_mom.astype(np.float32), **SCHEDULE_TOL)

  # What the optimizer applies, update by update, is that schedule.
  applied_lr, applied_mom = optimizer_hyperparams(config, total_steps)
  chex.assert_trees_all_close(applied_lr, t_lr.astype(np.float32), **SCHEDULE_TOL)
  chex.assert_trees_all_close(applied_mom, t_mom.astype(np.float32), **SCHEDULE_TOL)

  # The landmarks, explicitly: the first step, the peak, the last step.
  initial_lr = config.lr / config.div_factor
  peak = int(np.argmax(t_lr))
  assert peak == int(np.argmin(t_mom))
  np.testing.assert_allclose(  # the reference itself, against the closed forms
      [t_lr[0], t_mom[0], t_lr[-1], t_mom[-1]],
      [initial_lr, config.max_momentum, initial_lr / config.final_div_factor,
       config.max_momentum], rtol=1e-12)
  if (config.pct_start * total_steps).is_integer():  # the peak falls on a step
    assert peak == config.pct_start * total_steps - 1
    np.testing.assert_allclose([t_lr[peak], t_mom[peak]], [config.lr, config.base_momentum],
                               rtol=1e-12)
  for step in (0, peak, total_steps - 1):
    for name, ours, theirs in [("lr", lr[step], t_lr[step]),
                               ("applied lr", applied_lr[step], t_lr[step]),
                               ("momentum", mom[step], t_mom[step]),
                               ("applied momentum", applied_mom[step], t_mom[step])]:
      np.testing.assert_allclose(ours, theirs, rtol=1e-6, err_msg=f"{name} at step {step}")



def test_parity_swa_lr_phase_every_step():
  """With swa_lr, the reference and the optimizer agree: a shorter one-cycle, then constant."""
  config = CONFIG.replace(epochs=1, swa_lr=0.03, swa_start_frac=0.5)
  steps = 12
  run = ref.create_run(config, steps)
  images = torch.zeros(2, 1, 28, 28)
  labels = torch.zeros(2, dtype=torch.long)
  t_lr, t_mom = [], []
  for _ in range(steps):
    t_mom.append(run.optimizer.param_groups[0]["momentum"])
    ref.train_step(run, images, labels, labels, labels)
    t_lr.append(run.last_lr)
  t_lr, t_mom = np.asarray(t_lr), np.asarray(t_mom)
  cycle_lr, cycle_mom = torch_onecycle(6, config)  # over the 6 steps before averaging
  np.testing.assert_allclose(t_lr, np.r_[cycle_lr, [0.03] * 6], rtol=1e-12)
  np.testing.assert_allclose(t_mom, np.r_[cycle_mom, [config.max_momentum] * 6], rtol=1e-12)
  applied_lr, applied_mom = optimizer_hyperparams(config, steps)
  chex.assert_trees_all_close(applied_lr, t_lr.astype(np.float32), **SCHEDULE_TOL)
  chex.assert_trees_all_close(applied_mom, t_mom.astype(np.float32), **SCHEDULE_TOL)
  assert int(run.swa_model.n_averaged) == 6

def test_parity_optax_cosine_onecycle_is_one_step_late():
  """Why `adder.optim` has its own schedule: optax's peaks and ends a step later."""
  total_steps, config = 1000, CONFIG
  t_lr, _ = torch_onecycle(total_steps, config)
  schedule = optax.cosine_onecycle_schedule(
      total_steps, config.lr, pct_start=config.pct_start, div_factor=config.div_factor,
      final_div_factor=config.final_div_factor)
  optax_lr = np.asarray(jax.vmap(schedule)(jnp.arange(total_steps + 1)))
  peak, last = int(np.argmax(t_lr)), total_steps - 1
  min_lr = config.lr / config.div_factor / config.final_div_factor
  assert peak == 299
  assert abs(optax_lr[peak] - config.lr) > 1e-5 * config.lr  # PyTorch is at its peak here
  np.testing.assert_allclose(optax_lr[peak + 1], config.lr, rtol=1e-6)
  assert optax_lr[last] > 2 * min_lr  # PyTorch is at its floor here
  np.testing.assert_allclose(optax_lr[last + 1], min_lr, rtol=1e-5)
  assert not np.allclose(optax_lr[:total_steps], t_lr, **SCHEDULE_TOL)


# --- 5. averaging and BatchNorm recomputation ------------------------------------


@pytest.fixture(scope="module")
def jax_run():
  """50 real training steps in JAX: the data, the batches, and the state after each step."""
  variables = torch_init_variables(4)
  images, labels = fake_digits(4, NUM_TRAIN)
  rng = np.random.default_rng(4)
  indices = np.stack([rng.permutation(NUM_TRAIN)[:BATCH] for _ in range(STEPS)])
  numbers = rng.integers(0, 10, (STEPS, BATCH)).astype(np.int32)
  state = make_train_state(variables, RUN_TX)
  states = []
  for idx, nums in zip(indices, numbers):
    state, _ = TRAIN_STEP(state, step_lib.make_batch(images, labels, idx, nums))
    states.append(jax.device_get(state))
  return dict(variables=variables, images=images, states=states)


def bn_indices() -> np.ndarray:
  """update_bn's batches: the training set in order, full batches of BATCH."""
  return np.arange(NUM_TRAIN // BATCH * BATCH, dtype=np.int32).reshape(-1, BATCH)


def test_parity_swa_average_and_update_bn(jax_run):
  states, images = jax_run["states"], jax_run["images"]
  swa_start = optim.swa_start_step(RUN_CONFIG, STEPS)
  swa = optim.swa_state(states[-1].opt_state)
  assert swa_start == 38 and int(swa.n_averaged) == STEPS - swa_start

  # AveragedModel.update_parameters after each step from swa_start on, given the
  # same parameters: the average alone, apart from any training difference.
  model = torch_model(jax_run["variables"])
  averaged = AveragedModel(model)
  for step, state in enumerate(states):
    if step >= swa_start:
      state_dict = convert.flax_to_torch_state_dict({"params": state.params})
      model.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()},
                            strict=False)  # parameters only; buffers unchanged
      averaged.update_parameters(model)
  t_mean = convert.torch_state_dict_to_flax(dict(averaged.module.named_parameters()))["params"]
  chex.assert_trees_all_close(swa.mean, t_mean, atol=1e-6, rtol=1e-6)
  assert max_abs_diff(swa.mean, states[-1].params) > 1e-4  # an average, not the last iterate

  # BatchNorm statistics for the averaged weights: recompute_batch_stats vs update_bn.
  batch_stats = RECOMPUTE_BATCH_STATS(swa.mean, images, bn_indices())
  update_bn(ref.ordered_batches(ref.normalize_images(torch.from_numpy(images)), BATCH),
            averaged)
  assert int(averaged.module.bn0.num_batches_tracked) == NUM_TRAIN // BATCH
  chex.assert_trees_all_close(
      batch_stats, torch_variables(averaged.module)["batch_stats"], atol=1e-5, rtol=1e-5)


# --- 6. end to end ---------------------------------------------------------------


E2E_BATCH = 16  # float64 convolutions are slow in PyTorch on the CPU


def test_parity_fifty_steps_end_to_end():
  """50 steps of the real recipe agree: default lr, OneCycleLR over the 50 steps, SWA.

  Both runs start from the same weights and then run free for 50 steps on
  the same batches; parameters are compared after every step. In float64,
  because float32 rounding alone defeats a 1e-4 comparison here (measured at
  a peak lr of 0.1, half the default): the run is chaotic, so PyTorch float32
  and PyTorch float64 end 50 free-running steps ~3e-2 apart (a 1e-6 change of
  the initial weights grows ~1e4 times). In float64 the two frameworks stay
  within ~1e-7. The float32 tests above cover single steps.
  """
  images, labels = fake_digits(4, NUM_TRAIN)
  rng = np.random.default_rng(4)
  indices = np.stack([rng.permutation(NUM_TRAIN)[:E2E_BATCH] for _ in range(STEPS)])
  numbers = rng.integers(0, 10, (STEPS, E2E_BATCH)).astype(np.int32)
  held_images, held_labels = fake_digits(5, 64)
  held_numbers = np.random.default_rng(5).integers(0, 10, 64).astype(np.int32)
  variables = jax.tree_util.tree_map(lambda x: x.astype(np.float64), torch_init_variables(4))

  run = ref.create_run(RUN_CONFIG, STEPS, dtype=torch.float64,
                       state_dict=convert.flax_to_torch_state_dict(variables, dtype=np.float64))
  t_images = ref.normalize_images(torch.from_numpy(images)).double()
  t_labels = torch.from_numpy(labels.astype(np.int64))
  losses, t_losses, cross_entropies, param_diffs = [], [], [], []
  with jax.enable_x64(True):
    step_fn = jax.jit(step_lib.train_step)
    state = make_train_state(variables, RUN_TX)
    for idx, nums in zip(indices, numbers):
      state, metrics = step_fn(state, step_lib.make_batch(images, labels, idx, nums))
      losses.append(float(metrics["loss"]))
      cross_entropies.append(float(metrics["digit_loss"] + metrics["sum_loss"]))
      idx, nums = torch.from_numpy(idx.astype(np.int64)), torch.from_numpy(nums.astype(np.int64))
      t_losses.append(float(ref.train_step(
          run, t_images[idx], nums, t_labels[idx], t_labels[idx] + nums)))
      t_vars = convert.torch_state_dict_to_flax(run.model.state_dict(), dtype=np.float64)
      chex.assert_trees_all_close(state.params, t_vars["params"], atol=1e-4, rtol=0.0,
                                  custom_message=f"parameters after step {len(losses) - 1}")
      chex.assert_trees_all_close(state.batch_stats, t_vars["batch_stats"], atol=1e-4, rtol=0.0)
      param_diffs.append(max_abs_diff(state.params, t_vars["params"]))
    state = jax.device_get(state)
    assert state.params["conv0"]["kernel"].dtype == np.float64
    assert run.step == run.total_steps == STEPS
    chex.assert_trees_all_close(np.asarray(losses), np.asarray(t_losses), atol=1e-5, rtol=0.0)
    # It learned: equal parameters are not equal by standing still. (The
    # cross-entropies: in these 50 steps the consistency term rises, from
    # about 0.66 to 1.1, as the heads grow confident.)
    assert np.mean(cross_entropies[-5:]) < 0.8 * np.mean(cross_entropies[:5])

    # Identical predictions on a held-out batch.
    predictions = jax_predict({"params": state.params, "batch_stats": state.batch_stats},
                              held_images, held_numbers)
  model = run.model
  model.eval()
  with torch.no_grad():
    digit_logits, sum_logits = model((ref.normalize_images(
        torch.from_numpy(held_images)).double(), torch.from_numpy(held_numbers.astype(np.int64))))
  chex.assert_trees_all_equal(predictions, (digit_logits.argmax(1).numpy(),
                                            sum_logits.argmax(1).numpy()))

  # The averaged weights...
  swa = optim.swa_state(state.opt_state)
  assert int(swa.n_averaged) == int(run.swa_model.n_averaged) == STEPS - run.swa_start
  t_mean = convert.torch_state_dict_to_flax(
      dict(run.swa_model.module.named_parameters()), dtype=np.float64)["params"]
  chex.assert_trees_all_close(swa.mean, t_mean, atol=1e-4, rtol=0.0)
  # ... then, in float32, their BatchNorm statistics over the training set in
  # order, and their predictions.
  swa_params = jax.tree_util.tree_map(lambda x: x.astype(np.float32), swa.mean)
  swa_stats = RECOMPUTE_BATCH_STATS(swa_params, images, bn_indices())
  run.swa_model.float()
  swa_model = ref.finish_swa(run, ref.ordered_batches(t_images.float(), BATCH))
  chex.assert_trees_all_close(
      swa_stats, torch_variables(swa_model)["batch_stats"], atol=1e-4, rtol=0.0)
  chex.assert_trees_all_equal(
      jax_predict({"params": swa_params, "batch_stats": swa_stats}, held_images, held_numbers),
      torch_predict(swa_model, held_images, held_numbers))
  print(f"max parameter difference over the 50 steps: {max(param_diffs):.2e}")


# --- the reference's data pipeline ------------------------------------------------


def test_parity_reference_loader_workers_draw_distinct_integers():
  """Each DataLoader worker, and each epoch, draws its own integers."""
  images, labels = fake_digits(6, 64)
  loader = ref.make_loader(images, labels, 16, seed=0, shuffle=False, num_workers=2)
  loader.multiprocessing_context = "fork"  # fast start; the workers never touch JAX

  def epoch_numbers():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", RuntimeWarning)  # JAX's warning about fork
      return [n.numpy() for (_, n), _ in loader]

  first, second = epoch_numbers(), epoch_numbers()
  # Batches 0 and 2 come from worker 0, 1 and 3 from worker 1.
  assert not np.array_equal(first[0], first[1]), "workers repeat each other's integers"
  assert not np.array_equal(first[2], first[3])
  assert not np.array_equal(np.concatenate(first), np.concatenate(second)), (
      "epochs repeat their integers")
  (_, n), (digit, total) = loader.dataset[0]
  assert total == digit + n and 0 <= n <= 9


@pytest.mark.parametrize("pipeline", ["dataloader", "inmemory"])
def test_parity_reference_trainer_writes_adder_results_keys(tmp_path, pipeline):
  """The reference's results.json has adder.train's keys (the benchmark reads both)."""
  train_images, train_labels = fake_digits(7, 128)
  test_images, test_labels = fake_digits(8, 32)
  dataset = dict(train_images=train_images, train_labels=train_labels,
                 test_images=test_images, test_labels=test_labels)
  config = CONFIG.replace(epochs=2, batch_size=32, eval_batch_size=100)
  results = ref.train(config, str(tmp_path), dataset=dataset, pipeline=pipeline, log=False)

  written = json.loads((tmp_path / "results.json").read_text())
  assert written == json.loads(json.dumps(results))
  for name in ("final", "swa"):
    assert set(written[name]) == {"test", "exhaustive"}
    assert set(written[name]["test"]) >= {"digit_acc", "sum_acc", "joint_acc"}
    assert set(written[name]["exhaustive"]) >= {"digit_acc", "sum_acc", "joint_acc", "consistency"}
  for key in ("params", "backend", "devices", "train_seconds", "config", "versions"):
    assert key in written, key
  assert written["params"] == 17_393 and len(written["epoch_seconds"]) == 2
  assert Config.from_dict(written["config"]) == config
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
