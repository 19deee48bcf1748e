"""The one typed configuration object, its defaults, and flag parsing.

Every hyperparameter lives here. The command line (`python -m adder.train`)
overrides fields of `Config`; nothing downstream reads flags or environment
variables except the data-location fields resolved in `adder.data`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

# Fields that say where things are or how they are checked, not what is
# computed: a saved run may be resumed with other values (`run_differences`).
# Evaluation chunks change no prediction, and each case's loss is its own.
NOT_RUN_FIELDS = ("mnist_dir", "data_dir", "require_gpu", "eval_batch_size", "save_every_s")

# Fields added after runs had been saved, with the value that a saved config
# without them ran with (their defaults may differ): `Config.from_dict`.
ADDED_FIELDS = {"augment_scale": 0.0, "plain_last_epochs": 0, "swa_lr": None,
                "consistency_weight": 0.0, "augment_elastic_px": 0.0,
                "plain_batch_stats": False, "label_smoothing": 0.0}


@dataclasses.dataclass(frozen=True)
class Config:
  """Configuration of one training run. Immutable: use `dataclasses.replace`."""

  # --- data ---
  # Folder holding the four official MNIST IDX .gz files, given to TFDS as its
  # manual directory (offline preparation). None: $ADDER_MNIST_DIR, or TFDS's
  # own download.
  mnist_dir: Optional[str] = None
  # Where TFDS keeps the prepared (ArrayRecord) dataset, read without TensorFlow;
  # prepared there first if absent. None: $TFDS_DATA_DIR or TFDS's default.
  data_dir: Optional[str] = None
  # Seed of the fixed (image, integer) pairs of the `test` evaluation set.
  eval_seed: int = 1234
  # Augmentation of the training images (`adder.augment`), drawn per step on
  # the device: a uniform shift of up to this many pixels along each axis, a
  # rotation of up to this many degrees either way, and a scaling by a factor
  # in [1 - augment_scale, 1 + augment_scale]. All 0: none (the recipe of the
  # PyTorch reference and the parity tests).
  # Chosen by experiments/sweep.py over three seeds (README, "How the recipe
  # was chosen").
  augment_shift_px: float = 1.0
  augment_rotate_deg: float = 10.0
  augment_scale: float = 0.1
  # An elastic distortion on top: a smooth random displacement field whose
  # standard deviation along each axis is augment_elastic_px pixels, smoothed
  # by a Gaussian of std augment_elastic_sigma pixels (0 px: none).
  augment_elastic_px: float = 0.0
  augment_elastic_sigma: float = 4.0
  # The last this many epochs train on the images as they are (0: every epoch
  # augmented); nothing changes without augmentation.
  plain_last_epochs: int = 0
  # With augmentation, the final weights' BatchNorm statistics are recomputed
  # after training on the training images as they are, as the SWA weights'
  # always are (`adder.train.recompute_batch_stats`): the running statistics
  # describe augmented batches, not the plain images that are evaluated. False,
  # or no augmentation: the running statistics (the original's final weights).
  # Chosen by experiments/batch_stats.py over twelve trained runs (README, "How
  # the recipe was chosen").
  plain_batch_stats: bool = True

  # --- model ---
  # Channels of the five 3x3 conv blocks; the last is the image-embedding size.
  conv_features: tuple[int, ...] = (16, 16, 16, 16, 20)
  hidden_features: int = 60  # width of the two Dense layers after the concat
  bn_momentum: float = 0.9  # Flax convention: running = m*running + (1-m)*batch
  bn_epsilon: float = 1e-5

  # --- loss ---
  # Weight of the heads' agreement term (`adder.train.consistency_loss`): each
  # head is also trained toward the other's prediction, read through
  # sum = digit + number. 0: the two cross-entropies alone, the original's loss.
  # Chosen by experiments/sweep.py over three seeds (README, "How the recipe
  # was chosen").
  consistency_weight: float = 1.0
  # Label smoothing of both heads' cross-entropies: the target puts 1 -
  # label_smoothing on the true class and spreads label_smoothing evenly over
  # all classes (`optax.smooth_labels`). 0: the one-hot targets of the original.
  label_smoothing: float = 0.0

  # --- optimizer: SGD with momentum on PyTorch's OneCycleLR ---
  lr: float = 0.2  # peak learning rate (OneCycleLR's max_lr); chosen by experiments/sweep.py
  pct_start: float = 0.3  # share of steps spent warming up
  div_factor: float = 25.0  # initial lr = lr / div_factor
  final_div_factor: float = 1e4  # final lr = initial lr / final_div_factor
  base_momentum: float = 0.85  # momentum at peak lr
  max_momentum: float = 0.95  # momentum at the start and the end
  weight_decay: float = 5e-4  # L2 added to the gradient, as torch.optim.SGD does
  nesterov: bool = False

  # --- averaging (SWA) ---
  swa: bool = True
  swa_start_frac: float = 0.75  # average parameters over the last 25% of steps
  # The learning rate of the averaging phase. None: the one-cycle schedule runs
  # over every step, so the averaged weights come from its annealed tail. A
  # value: the one-cycle schedule ends where averaging starts, and the
  # averaging phase holds this learning rate (and the one-cycle's final
  # momentum), as in the SWA paper's constant-rate phase.
  swa_lr: Optional[float] = None

  # --- training ---
  epochs: int = 20
  batch_size: int = 128
  eval_batch_size: int = 10_000
  seed: int = 0
  require_gpu: bool = False
  # The training state is saved after an epoch once this many seconds have
  # passed since the last save, and always after the last epoch; 0 saves every
  # epoch. A save holds training up for about 50-80 ms: nothing on the CPU's
  # 15 s epochs, a quarter of a 0.19 s epoch on a GPU.
  save_every_s: float = 30.0

  @property
  def augment(self) -> bool:
    """Whether training images are augmented."""
    return (self.augment_shift_px > 0 or self.augment_rotate_deg > 0 or self.augment_scale > 0
            or self.augment_elastic_px > 0)

  def without_augmentation(self) -> "Config":
    """This recipe with the training images as they are (the PyTorch reference's).

    The loss is kept: ``replace(consistency_weight=0)`` gives the original's.
    """
    return self.replace(augment_shift_px=0.0, augment_rotate_deg=0.0, augment_scale=0.0,
                        augment_elastic_px=0.0, plain_last_epochs=0)

  @property
  def recomputes_final_batch_stats(self) -> bool:
    """Whether the final weights get BatchNorm statistics of the plain training images."""
    return self.plain_batch_stats and self.augment

  def augments_epoch(self, epoch: int) -> bool:
    """Whether 1-based `epoch` trains on augmented images."""
    return self.augment and epoch <= self.epochs - self.plain_last_epochs

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


def run_differences(saved: Config, config: Config) -> dict[str, tuple[Any, Any]]:
  """The fields, outside `NOT_RUN_FIELDS`, whose values differ: ``{name: (saved, config)}``.

  Empty when resuming `saved` under `config` continues the same run.
  """
  return {f.name: (getattr(saved, f.name), getattr(config, f.name))
          for f in dataclasses.fields(Config)
          if f.name not in NOT_RUN_FIELDS and getattr(saved, f.name) != getattr(config, f.name)}


def add_recipe_flags(parser) -> None:
  """Flags shared by every trainer of the recipe (adder.train, the PyTorch reference).

  Their defaults are `Config`'s; `config_from_flags` reads them back.
  """
  d = Config()
  parser.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
  parser.add_argument("--batch-size", type=int, default=d.batch_size,
                      help="global batch size (default: %(default)s)")
  parser.add_argument("--lr", type=float, default=d.lr,
                      help="peak learning rate of the one-cycle schedule (default: %(default)s)")
  parser.add_argument("--seed", type=int, default=d.seed,
                      help="seeds initialisation, shuffling and the integers "
                           "(default: %(default)s)")
  add_data_flags(parser)
  parser.add_argument("--consistency-weight", type=float, default=d.consistency_weight,
                      metavar="W",
                      help="weight of the term that trains each head toward the other's "
                           "prediction (0: cross-entropies alone; default: %(default)s)")
  parser.add_argument("--no-swa", action="store_true",
                      help="do not average weights over the last 25%% of steps")
  parser.add_argument("--swa-lr", type=float, default=d.swa_lr, metavar="LR",
                      help="hold this learning rate while averaging, the one-cycle "
                           "schedule ending where averaging starts (default: the "
                           "one-cycle schedule over every step)")


def add_data_flags(parser) -> None:
  """``--mnist-dir`` and ``--data-dir``: where MNIST is, for every command that reads it."""
  parser.add_argument("--mnist-dir", default=None,
                      help="folder with the four official MNIST IDX .gz files, used as "
                           "TFDS's manual directory (default: $ADDER_MNIST_DIR, else TFDS "
                           "downloads)")
  parser.add_argument("--data-dir", default=None,
                      help="where the prepared MNIST is kept, as written by `python -m "
                           "adder.data`; prepared there if absent (default: $TFDS_DATA_DIR "
                           "or ~/tensorflow_datasets)")


def config_from_flags(parser, args) -> Config:
  """The `Config` named by the flags of `add_recipe_flags`; bad values end via parser.error."""
  for name in ("epochs", "batch_size"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be at least 1")
  for name in ("lr", "swa_lr"):
    value = getattr(args, name)
    if value is not None and not 0 < value < float("inf"):
      parser.error(f"--{name.replace('_', '-')} must be a positive number")
  if not 0 <= args.consistency_weight < float("inf"):
    parser.error("--consistency-weight must be a number >= 0")
  return Config().replace(
      epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
      mnist_dir=args.mnist_dir, data_dir=args.data_dir, swa=not args.no_swa,
      swa_lr=args.swa_lr, consistency_weight=args.consistency_weight)
