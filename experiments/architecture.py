"""The architecture figure, drawn from the model's own layer shapes and parameters.

Command (from the repository root; what produced docs/figures/architecture.png):

  python experiments/architecture.py --out docs/figures/architecture.png

It printed the layer table below and ``17,393 parameters``.

Nothing here restates the layout: `layers` traces `AdderNet` of the default
`Config` with `jax.eval_shape` (no computation), records every submodule call's
input and output shapes through `flax.linen.intercept_methods`, and counts each
one's trainable parameters in the params tree. The pooling steps are where a
convolution's input is smaller than the block before it gave; the embedding
and the one-hot integer are the two parts of the first Dense layer's input.
Run with ``--config-from WORKDIR`` to draw the model of a saved run instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from adder import model as model_lib  # noqa: E402
from adder.config import Config  # noqa: E402

PathTuple = tuple[int, ...]


def _module_calls(model: nn.Module) -> tuple[list[dict[str, Any]], dict]:
  """Every submodule ``__call__`` of one abstract forward pass, in call order.

  Returns ([{"name", "kind", "in": shape, "out": shape}], the params tree of
  `jax.ShapeDtypeStruct`), for a batch of one.
  """
  calls = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and module.name is not None:
      calls.append({"name": module.name, "kind": type(module).__name__,
                    "in": tuple(args[0].shape[1:]), "out": tuple(out.shape[1:])})
    return out

  def init():
    with nn.intercept_methods(record):
      return model.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1), jnp.float32),
                        jnp.zeros((1,), jnp.int32), train=False)

  variables = jax.eval_shape(init)
  return calls, variables["params"]


def _count(tree) -> int:
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def layers(config: Config) -> list[dict[str, Any]]:
  """The network as the figure draws it: one dict per box, in data order.

  Each has ``name``, ``op`` (what it does), ``shape`` (its output, without the
  batch axis) and ``params`` (trainable scalars); a conv block (convolution,
  BatchNorm, ReLU) is one box. ``branch`` is ``"image"``, ``"integer"``,
  ``"joint"`` or ``"head"``.
  """
  model = model_lib.create_model(config)
  calls, params = _module_calls(model)
  convs = [c for c in calls if c["kind"] == "Conv"]
  dense = [c for c in calls if c["kind"] == "Dense"]
  boxes = [{"name": "image", "op": "input, normalised", "shape": convs[0]["in"],
            "params": 0, "branch": "image"}]
  for conv in convs:
    if conv["in"] != boxes[-1]["shape"]:  # a pooling step between two blocks
      boxes.append({"name": "pool", "op": "max pool 2x2", "shape": conv["in"],
                    "params": 0, "branch": "image"})
    bn = conv["name"].replace("conv", "bn")
    kh, kw = params[conv["name"]]["kernel"].shape[:2]
    boxes.append({"name": f"{conv['name']} + {bn}",
                  "op": f"conv {kh}x{kw}, BN, ReLU",
                  "shape": conv["out"], "params": _count(params[conv["name"]])
                  + _count(params[bn]), "branch": "image"})
  embedding = boxes[-1]["shape"][-1]
  boxes.append({"name": "embedding", "op": "global mean", "shape": (embedding,),
                "params": 0, "branch": "image"})
  joint = dense[0]["in"][-1]
  boxes.append({"name": "integer", "op": "input, 0-9", "shape": (), "params": 0,
                "branch": "integer"})
  boxes.append({"name": "one-hot", "op": "of the integer", "shape": (joint - embedding,),
                "params": 0, "branch": "integer"})
  boxes.append({"name": "concat", "op": "concatenate", "shape": (joint,), "params": 0,
                "branch": "joint"})
  for d in dense:
    head = d["name"].endswith("head")
    boxes.append({"name": d["name"], "op": "dense" if head else "dense, ReLU",
                  "shape": d["out"], "params": _count(params[d["name"]]),
                  "branch": "head" if head else "joint"})
  return boxes


def _shape_text(shape: PathTuple) -> str:
  return "x".join(str(n) for n in shape) if shape else "scalar"


def table(boxes: list[dict[str, Any]]) -> str:
  """A Markdown table of the boxes: name, operation, output shape, parameters."""
  rows = ["| layer | operation | output | parameters |", "|---|---|---|---:|"]
  for b in boxes:
    rows.append(f"| {b['name']} | {b['op']} | {_shape_text(b['shape'])} | {b['params']:,} |")
  return "\n".join(rows)


def _box(ax, x: float, y: float, b: dict[str, Any], color: str):
  """The box of one layer at (x, y); returns its text artist, which arrows attach to."""
  text = f"{b['name']}: {b['op']}\n{_shape_text(b['shape'])}"
  if b["params"]:
    text += f", {b['params']:,} params"
  return ax.text(x, y, text, ha="center", va="center", fontsize=8,
                 bbox={"boxstyle": "round,pad=0.4", "facecolor": color, "edgecolor": "0.3"})


def _arrow(ax, source, target, down: bool) -> None:
  """An arrow from one box's bottom (`down`) or right side to the next one's top or left."""
  start, end = ((0.5, 0.0), (0.5, 1.0)) if down else ((1.0, 0.5), (0.0, 0.5))
  ax.annotate("", xy=end, xycoords=target, xytext=start, textcoords=source,
              arrowprops={"arrowstyle": "->", "color": "0.3", "shrinkA": 5, "shrinkB": 5})


def draw(boxes: list[dict[str, Any]], path: str) -> str:
  """The image branch down the left, the integer beside it, then the joint layers and heads.

  Returns `path`, the PNG written.
  """
  from adder import plots  # pylint: disable=g-import-not-at-top

  image = [b for b in boxes if b["branch"] == "image"]
  integer = [b for b in boxes if b["branch"] == "integer"]
  joint = [b for b in boxes if b["branch"] == "joint"]
  heads = [b for b in boxes if b["branch"] == "head"]
  colors = {"image": "#dbe9f6", "integer": "#fde5c8", "joint": "#e3f1dc", "head": "#f6d9d9"}
  dx = 2.4  # between columns, in row heights
  cols = 1 + len(joint) + 1
  fig = plots.new_figure(figsize=(2.3 * cols, 0.62 * len(image) + 0.8))
  ax = fig.subplots()
  ax.set_axis_off()
  bottom = -(len(image) - 1)  # the image branch runs down from row 0 to here
  column = [_box(ax, 0, -i, b, colors["image"]) for i, b in enumerate(image)]
  # The integer branch comes down the second column to the concat, beside the embedding.
  column2 = [_box(ax, dx, bottom + len(integer) - i, b, colors["integer"])
             for i, b in enumerate(integer)]
  row = [_box(ax, dx * (1 + i), bottom, b, colors["joint"]) for i, b in enumerate(joint)]
  xh = dx * (1 + len(joint))
  ys = [bottom + 0.6, bottom - 0.6] if len(heads) == 2 else [bottom] * len(heads)
  ends = [_box(ax, xh, y, b, colors["head"]) for y, b in zip(ys, heads)]
  fig.canvas.draw()  # the boxes' extents, for the arrows
  for chain in (column, column2 + row[:1]):
    for a, b in zip(chain, chain[1:]):
      _arrow(ax, a, b, down=True)
  for a, b in zip([column[-1]] + row, row + ends[:1]):
    _arrow(ax, a, b, down=False)
  for head in ends[1:]:
    _arrow(ax, row[-1], head, down=False)
  branches = (("image branch", "image"), ("integer", "integer"),
              ("joint layers", "joint"), ("heads", "head"))
  summary = "\n".join(f"{label}: {sum(b['params'] for b in boxes if b['branch'] == k):,}"
                       for label, k in branches)
  ax.text(xh, 0, "trainable parameters\n" + summary, ha="center", va="top", fontsize=9)
  ax.set_xlim(-1.2, xh + 1.2)
  ax.set_ylim(bottom - 1.2, 0.6)
  total = sum(b["params"] for b in boxes)
  ax.set_title(f"AdderNet: {total:,} trainable parameters\n(output shapes without the "
               "batch axis, traced from adder.model)", fontsize=10)
  return plots.save(fig, path)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python experiments/architecture.py",
                              description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="the PNG to write")
  p.add_argument("--config-from", metavar="WORKDIR", default=None,
                 help="draw the model of this run's results.json config (default: Config())")
  a = p.parse_args(argv)
  config = Config()
  if a.config_from:
    try:
      with open(os.path.join(a.config_from, "results.json")) as f:
        config = Config.from_dict(json.load(f)["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      print(f"error: cannot read the config of {a.config_from}: {e}", file=sys.stderr)
      return 2
  boxes = layers(config)
  print(table(boxes))
  try:
    draw(boxes, a.out)
  except OSError as e:
    print(f"error: cannot write {a.out}: {e}", file=sys.stderr)
    return 2
  print(f"{sum(b['params'] for b in boxes):,} parameters; wrote {a.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
