"""The one typed configuration object: its fields, its checks and its flags.

Every hyperparameter lives in `Config`. `Config.validate` checks every field
against its allowed range, so a notebook's ``Config(...)`` gets the checks a
command line gets. Each field that a command line may set declares its flag
beside it (`_field`); `add_flags` adds a chosen set of them to an argparse
parser and `from_flags` reads them back, so ``adder.train``, ``adder.lr_find``
and ``experiments/torch_reference.py`` share one definition of each flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from typing import Any, Optional, Sequence

# Fields that say where things are or how they are checked, not what is
# computed: a saved run may be resumed with other values (`run_differences`).
# Evaluation chunks change no prediction, and each case's loss is its own.
NOT_RUN_FIELDS = ("mnist_dir", "data_dir", "require_gpu", "eval_batch_size", "save_every_s")

# Fields added after runs had been saved, with the value that a saved config
# without them ran with (their defaults may differ): `Config.from_dict`.
ADDED_FIELDS = {"augment_scale": 0.0, "swa_lr": None, "consistency_weight": 0.0,
                "plain_batch_stats": False}

# Fields that runs were once saved with and that no longer exist, with the
# value under which this version computes the same thing. Their screens lost
# (docs/recipe-search.md); `unsupported_fields` names a saved run that needs
# another value, which this version cannot resume.
REMOVED_FIELDS = {"label_smoothing": 0.0, "plain_last_epochs": 0, "augment_elastic_px": 0.0}

INF = math.inf


def _field(default: Any, flag: Optional[str] = None,
           help: str = "",  # pylint: disable=redefined-builtin
           *, low: float = -INF, high: float = INF, low_open: bool = False,
           metavar: Optional[str] = None, invert: bool = False) -> Any:
  """A `Config` field with its range ``[low, high]`` (``(low, high]`` with `low_open`).

  With a `flag`, the command line may set it; a boolean flag stores True, or
  with `invert` False (``--no-swa`` sets ``swa=False``).
  """
  return dataclasses.field(default=default, metadata=dict(
      flag=flag, help=help, low=low, high=high, low_open=low_open, metavar=metavar,
      invert=invert))


@dataclasses.dataclass(frozen=True)
class Config:
  """Configuration of one training run. Immutable: use `replace`; check with `validate`."""

  # --- data ---
  # Folder holding the four official MNIST IDX .gz files, given to TFDS as its
  # manual directory (offline preparation). None: $ADDER_MNIST_DIR, or TFDS's
  # own download.
  mnist_dir: Optional[str] = _field(
      None, "--mnist-dir", "folder with the four official MNIST IDX .gz files, used as "
      "TFDS's manual directory (default: $ADDER_MNIST_DIR, else TFDS downloads)")
  # Where TFDS keeps the prepared (ArrayRecord) dataset, read without TensorFlow;
  # prepared there first if absent. None: $TFDS_DATA_DIR or TFDS's default.
  data_dir: Optional[str] = _field(
      None, "--data-dir", "where the prepared MNIST is kept, as written by `python -m "
      "adder.data`; prepared there if absent (default: $TFDS_DATA_DIR or "
      "~/tensorflow_datasets)")
  # Seed of the fixed (image, integer) pairs of the `test` evaluation set.
  eval_seed: int = 1234
  # Augmentation of the training images (`adder.augment`), drawn per step on
  # the device: a uniform shift of up to this many pixels along each axis, a
  # rotation of up to this many degrees either way, and a scaling by a factor
  # in [1 - augment_scale, 1 + augment_scale]. All 0: none (the recipe of the
  # PyTorch reference and the parity tests). Chosen by experiments/sweep.py
  # over three seeds (docs/recipe-search.md).
  augment_shift_px: float = _field(
      1.0, "--augment-shift", "largest random shift of a training image along each axis",
      low=0, high=14, metavar="PIXELS")
  augment_rotate_deg: float = _field(
      10.0, "--augment-rotate", "largest random rotation of a training image either way",
      low=0, high=180, metavar="DEGREES")
  augment_scale: float = _field(
      0.1, "--augment-scale", "largest random change of a training image's size either "
      "way, e.g. 0.1 for 90-110%%", low=0, high=0.5, metavar="FRACTION")
  # With augmentation, the final weights' BatchNorm statistics are recomputed
  # after training on the training images as they are, as the SWA weights'
  # always are (`adder.batch_norm`): the running statistics describe augmented
  # batches, not the plain images that are evaluated. False (the flag), or no
  # augmentation: the running statistics, as the original's final weights
  # (the flag is kept for the BatchNorm table of docs/recipe-search.md).
  # Chosen by experiments/batch_stats.py over twelve runs (docs/recipe-search.md).
  plain_batch_stats: bool = _field(
      True, "--running-batch-stats", "keep the final weights' running BatchNorm "
      "statistics (default: after augmented training, recompute them on the plain "
      "training images, as the SWA weights' are)", invert=True)

  # --- model ---
  # Channels of the five 3x3 conv blocks; the last is the image-embedding size.
  conv_features: tuple[int, ...] = (16, 16, 16, 16, 20)
  hidden_features: int = _field(60, low=1)  # width of the two Dense layers after the concat
  bn_momentum: float = _field(0.9, low=0, high=1)  # Flax: running = m*running + (1-m)*batch
  bn_epsilon: float = _field(1e-5, low=0, low_open=True)

  # --- loss ---
  # Weight of the heads' agreement term (`adder.losses.consistency_loss`):
  # each head is also trained toward the other's prediction, read through
  # sum = digit + number. 0: the two cross-entropies alone, the original's
  # loss. Chosen by experiments/sweep.py over three seeds.
  consistency_weight: float = _field(
      1.0, "--consistency-weight", "weight of the term that trains each head toward the "
      "other's prediction (0: cross-entropies alone)", low=0, metavar="W")

  # --- optimizer: SGD with momentum on PyTorch's OneCycleLR ---
  lr: float = _field(0.2, "--lr", "peak learning rate of the one-cycle schedule",
                     low=0, low_open=True)  # chosen by experiments/sweep.py
  pct_start: float = _field(0.3, low=0, high=1, low_open=True)  # share of steps warming up
  div_factor: float = _field(25.0, low=0, low_open=True)  # initial lr = lr / div_factor
  final_div_factor: float = _field(1e4, low=0, low_open=True)  # final lr = initial / this
  base_momentum: float = _field(0.85, low=0, high=1)  # momentum at peak lr
  max_momentum: float = _field(0.95, low=0, high=1)  # momentum at the start and the end
  weight_decay: float = _field(5e-4, low=0)  # L2 added to the gradient, as torch.optim.SGD
  nesterov: bool = False  # torch.optim.SGD's, spelled out for the PyTorch reference

  # --- averaging (SWA) ---
  swa: bool = _field(True, "--no-swa", "do not average weights over the last 25%% of steps",
                     invert=True)
  swa_start_frac: float = _field(0.75, low=0, high=1)  # average over the last 25% of steps
  # The learning rate of the averaging phase. None: the one-cycle schedule runs
  # over every step, so the averaged weights come from its annealed tail. A
  # value: the one-cycle schedule ends where averaging starts, and the
  # averaging phase holds this learning rate (and the one-cycle's final
  # momentum), as in the SWA paper's constant-rate phase and PyTorch's SWALR.
  # Its screen lost (docs/recipe-search.md); kept because the PyTorch reference
  # runs it too and the parity tests check that phase against torch's SWALR.
  swa_lr: Optional[float] = _field(
      None, "--swa-lr", "hold this learning rate while averaging, the one-cycle schedule "
      "ending where averaging starts (default: the one-cycle schedule over every step)",
      low=0, low_open=True, metavar="LR")

  # --- training ---
  epochs: int = _field(20, "--epochs", "number of epochs", low=1)
  batch_size: int = _field(128, "--batch-size", "global batch size", low=1)
  eval_batch_size: int = _field(10_000, low=1)
  seed: int = _field(0, "--seed", "seeds initialisation, shuffling and the integers")
  require_gpu: bool = _field(False, "--require-gpu", "refuse to train unless JAX sees a GPU")
  # The training state is saved after an epoch once this many seconds have
  # passed since the last save, after the last epoch, and after the epoch in
  # progress when a signal stops the run; 0 saves every epoch. A save holds
  # training up for about 50-80 ms: little against a CPU epoch of 5-9 s, a
  # quarter of a 0.19 s epoch on a GPU.
  save_every_s: float = _field(
      30.0, "--save-every", "save the training state after an epoch once this many "
      "seconds have passed since the last save, and after the last epoch; 0: every epoch",
      low=0, metavar="SECONDS")

  def validate(self) -> "Config":
    """This config, if every field is in its range; else ValueError naming the field.

    The message names the field, its flag where it has one, the allowed range
    and the value given.
    """
    for f in dataclasses.fields(self):
      value, m = getattr(self, f.name), f.metadata
      if not m or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue  # strings, None and switches have no range
      low, high = m["low"], m["high"]
      above = value > low if m["low_open"] else value >= low
      if not (above and value <= high):  # also False for NaN
        flag = f" ({m['flag']})" if m["flag"] else ""
        raise ValueError(f"{f.name}{flag} must be {_range(low, high, m['low_open'])}, "
                         f"got {value!r}")
    if not self.conv_features or min(self.conv_features) < 1:
      raise ValueError(f"conv_features must be positive channel counts, got "
                       f"{self.conv_features!r}")
    return self

  @property
  def augment(self) -> bool:
    """Whether training images are augmented."""
    return self.augment_shift_px > 0 or self.augment_rotate_deg > 0 or self.augment_scale > 0

  def without_augmentation(self) -> "Config":
    """This recipe with the training images as they are (the PyTorch reference's).

    The loss is kept: ``replace(consistency_weight=0)`` gives the original's.
    """
    return self.replace(augment_shift_px=0.0, augment_rotate_deg=0.0, augment_scale=0.0)

  @property
  def recomputes_final_batch_stats(self) -> bool:
    """Whether the final weights get BatchNorm statistics of the plain training images."""
    return self.plain_batch_stats and self.augment

  def replace(self, **changes: Any) -> "Config":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["conv_features"] = list(self.conv_features)
    return d

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Config":
    """The config of a saved ``to_dict``; unknown keys are dropped.

    A field missing from it takes the value the saved run had (`ADDED_FIELDS`),
    else its default: a run saved before a field existed resumes unchanged.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    d = {**ADDED_FIELDS, **{k: v for k, v in d.items() if k in known}}
    if "conv_features" in d:
      d["conv_features"] = tuple(d["conv_features"])
    return cls(**d)


def _range(low: float, high: float, low_open: bool) -> str:
  lower = f"{'more than' if low_open else 'at least'} {low:g}"
  return lower if high == INF else f"{lower} and at most {high:g}"


def unsupported_fields(saved: dict[str, Any]) -> dict[str, Any]:
  """The `REMOVED_FIELDS` that a saved ``to_dict`` sets to another value: ``{name: value}``."""
  return {k: saved[k] for k, v in REMOVED_FIELDS.items() if saved.get(k, v) != v}


def run_differences(saved: Config, config: Config) -> dict[str, tuple[Any, Any]]:
  """The fields, outside `NOT_RUN_FIELDS`, whose values differ: ``{name: (saved, config)}``.

  Empty when resuming `saved` under `config` continues the same run.
  """
  return {f.name: (getattr(saved, f.name), getattr(config, f.name))
          for f in dataclasses.fields(Config)
          if f.name not in NOT_RUN_FIELDS and getattr(saved, f.name) != getattr(config, f.name)}


# The flags of the recipe, as `python -m adder.train` takes them. The PyTorch
# reference takes those of `REFERENCE_FLAGS` (it trains without augmentation).
DATA_FLAGS = ("mnist_dir", "data_dir")
REFERENCE_FLAGS = ("epochs", "batch_size", "lr", "seed", *DATA_FLAGS, "consistency_weight",
                   "swa", "swa_lr")
AUGMENT_FLAGS = ("augment_shift_px", "augment_rotate_deg", "augment_scale")
TRAIN_FLAGS = (*REFERENCE_FLAGS, *AUGMENT_FLAGS, "plain_batch_stats", "save_every_s",
               "require_gpu")
NO_AUGMENT = "--no-augment"


def add_flags(parser: argparse.ArgumentParser, names: Sequence[str] = TRAIN_FLAGS) -> None:
  """Add the flags of the `Config` fields `names` to `parser`, defaults `Config`'s.

  With the augmentation fields, ``--no-augment`` comes too. `from_flags`
  reads the parsed flags back into a `Config`.
  """
  fields = {f.name: f for f in dataclasses.fields(Config)}
  for name in names:
    f = fields[name]
    m = f.metadata
    if f.type in (bool, "bool"):
      parser.add_argument(m["flag"], dest=name, default=f.default, help=m["help"],
                          action="store_false" if m["invert"] else "store_true")
      continue
    kind = {"int": int, "float": float, "Optional[float]": float}.get(str(f.type), str)
    default = "" if f.default is None else " (default: %(default)s)"
    parser.add_argument(m["flag"], dest=name, type=kind, default=f.default,
                        metavar=m["metavar"], help=m["help"] + default)
  if set(AUGMENT_FLAGS) <= set(names):
    parser.add_argument(NO_AUGMENT, action="store_true",
                        help="train on the images as they are (the PyTorch reference's recipe)")


def from_flags(args: argparse.Namespace, base: Optional[Config] = None) -> Config:
  """`base` (default: `Config()`) with the fields that `add_flags` parsed into `args`.

  Not yet validated: call `Config.validate`.
  """
  names = {f.name for f in dataclasses.fields(Config)} & set(vars(args))
  config = (base or Config()).replace(**{name: getattr(args, name) for name in names})
  if getattr(args, NO_AUGMENT[2:].replace("-", "_"), False):
    config = config.without_augmentation()
  return config
