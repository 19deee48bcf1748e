"""The JSON API's requests and answers: models, limits, image decoding, error lines.

`adder.serve` routes ``POST /api/predict`` bodies through the pydantic models
here. A body is one item, ``{"png" | "array", "number"}``, or a batch,
``{"items": [item, ...]}``; either may ask for ``"return_image": true`` to get
back the 28x28 image the model saw. An item's image is either

* ``png``: a PNG, base64 (a ``data:image/png;base64,`` prefix is allowed), of
  any size up to `MAX_IMAGE_SIDE` px a side, prepared by
  `adder.predict.prepare_image`, the CLI's own preparation (greyscale,
  dark-on-light inverted, digit fitted into 20x20 and centred by mass in
  28x28); or
* ``array``: 28x28 grey values 0-255 already in MNIST's form (white digit on
  black, as in the MNIST files), given to the model as they are.

Every refusal is one line: `error_line` turns pydantic's error list into
``"<field>: <reason>"``, and `prepare` raises `BadInput` with such a line.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Annotated, Any, Optional, Union

import numpy as np
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, field_validator
from pydantic import model_validator

from adder import predict

MAX_BODY_BYTES = 1 << 20  # 1 MiB: larger bodies are refused before they are read
MAX_BATCH = 64  # items in one request
MAX_IMAGE_SIDE = 4096  # px; a PNG's size is read from its header, before any pixel
SIDE = predict.MNIST_SIZE
_DATA_URL_PREFIX = "data:image/png;base64,"


class BadInput(ValueError):
  """A request the models accepted but whose content is unusable; one line."""


class Item(BaseModel):
  """One image and the integer to add to its digit."""

  model_config = ConfigDict(extra="forbid")

  number: Annotated[int, Strict()] = Field(ge=0, le=9, description="the integer to add, 0-9")
  png: Optional[str] = Field(
      None, description="a PNG, base64, optionally as a data URL; any size up to "
                        f"{MAX_IMAGE_SIDE} px a side, dark-on-light or light-on-dark")
  array: Optional[list[list[Annotated[float, Strict()]]]] = Field(
      None, description="28 rows of 28 grey values 0-255 in MNIST's form: white digit on black")

  @field_validator("array")
  @classmethod
  def _check_array(cls, rows: Optional[list[list[float]]]) -> Optional[list[list[float]]]:
    if rows is None:
      return rows
    if len(rows) != SIDE or any(len(row) != SIDE for row in rows):
      widths = sorted({len(row) for row in rows})
      raise ValueError(f"must be {SIDE} rows of {SIDE} values, got {len(rows)} rows of "
                       f"{'/'.join(map(str, widths)) or 0}")
    values = np.asarray(rows, np.float64)
    if not np.all((values >= 0) & (values <= 255)):  # NaN fails both comparisons
      raise ValueError("grey values must be in 0..255")
    return rows

  @model_validator(mode="after")
  def _one_image(self) -> "Item":
    if (self.png is None) == (self.array is None):
      raise ValueError("give exactly one image: png or array")
    return self


class Single(Item):
  """A request for one prediction."""

  return_image: bool = Field(False, description="also return the 28x28 image the model saw")


class Batch(BaseModel):
  """A request for up to `MAX_BATCH` predictions."""

  model_config = ConfigDict(extra="forbid")

  items: list[Item] = Field(min_length=1, max_length=MAX_BATCH,
                            description=f"1 to {MAX_BATCH} items")
  return_image: bool = Field(False, description="also return the 28x28 images the model saw")


def _kind(body: Any) -> str:
  return "batch" if isinstance(body, dict) and "items" in body else "single"


PredictRequest = Annotated[
    Union[Annotated[Single, Tag("single")], Annotated[Batch, Tag("batch")]],
    Discriminator(_kind)]


class Prediction(BaseModel):
  """The answer for one item."""

  digit: int = Field(description="the digit read, 0-9")
  sum: int = Field(description="the sum read, 0-18")
  digit_probs: list[float] = Field(description="softmax over digits 0-9 (10 values)")
  sum_probs: list[float] = Field(description="softmax over sums 0-18 (19 values)")
  image: Optional[list[list[int]]] = Field(
      None, description="with return_image: the 28x28 image (0-255, white on black) the model saw")


class BatchPrediction(BaseModel):
  """The answers for a batch, in its order."""

  predictions: list[Prediction]


class Health(BaseModel):
  """What the server runs."""

  status: str
  checkpoint: str = Field(description="the checkpoint's path")
  weights: str = Field(description="the weight set in use: swa or final")
  backend: str = Field(description="JAX's default backend (cpu, gpu, tpu)")
  devices: list[str]
  batching: str = Field(description="micro: concurrent requests share one model call; "
                                    "off: one model call per request")
  max_batch: int
  compiled_batch_sizes: list[int] = Field(
      description="batch sizes compiled at start-up; a batch is padded to the next one")


class ErrorBody(BaseModel):
  """Every 4xx answer."""

  error: str = Field(description="one line saying what was wrong")


def error_line(errors: list[dict], body: Any = None) -> str:
  """pydantic / FastAPI validation errors of `body` -> one line naming the first bad field."""
  # FastAPI may report both members of the union: keep those of the body's kind.
  other = "single" if _kind(body) == "batch" else "batch"
  errors = [e for e in errors if other not in e.get("loc", ())] or errors
  if not errors:
    return "invalid request"
  e = errors[0]
  if e.get("type") == "json_invalid":
    return f"malformed JSON: {e.get('ctx', {}).get('error', 'cannot parse the body')}"
  # "body" and the union's tags are where FastAPI and pydantic put the field, not its name.
  loc = [str(part) for part in e.get("loc", ()) if part not in ("body", "single", "batch")]
  msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
  if not loc and e.get("type") in ("missing", "model_type", "model_attributes_type", "dict_type"):
    return ('the body must be a JSON object (Content-Type: application/json): '
            '{"png" or "array", "number"} or {"items": [...]}')
  if e.get("type") == "extra_forbidden":
    msg = "unknown field"
  return f"{'.'.join(loc)}: {msg}" if loc else msg


def _png_image(text: str, where: str) -> Image.Image:
  """Base64 PNG -> a decoded Pillow image; BadInput if not one, or over the size limit."""
  if text.startswith("data:"):
    if not text.startswith(_DATA_URL_PREFIX):
      raise BadInput(f"{where}: a data URL must start with {_DATA_URL_PREFIX!r}")
    text = text[len(_DATA_URL_PREFIX):]
  try:
    data = base64.b64decode(text, validate=True)
  except (binascii.Error, ValueError) as e:
    raise BadInput(f"{where}: not valid base64 ({e})") from e
  try:
    img = Image.open(io.BytesIO(data), formats=["PNG"])  # reads the header only
  except Image.DecompressionBombError as e:
    raise BadInput(f"{where}: the image is over {MAX_IMAGE_SIDE} px a side") from e
  except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise BadInput(f"{where}: the bytes are not a PNG image") from e
  width, height = img.size
  if max(width, height) > MAX_IMAGE_SIDE:
    raise BadInput(f"{where}: the image is {width}x{height} px, over {MAX_IMAGE_SIDE} px a side")
  try:
    img.load()
    return ImageOps.exif_transpose(img)  # as adder.predict does for files
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise BadInput(f"{where}: cannot decode the PNG ({e})") from e


def prepare(item: Item, where: str = "") -> np.ndarray:
  """An item's image in MNIST form, float32 (28, 28) in [0, 255], white on black.

  Args:
    item: a validated item.
    where: the field path used in error lines ("" for a single item,
      ``"items.3."`` in a batch).

  Raises:
    BadInput: the PNG is not a readable PNG, too large, or shows no digit.
  """
  if item.array is not None:
    return np.asarray(item.array, np.float32)
  try:
    return predict.prepare_image(_png_image(item.png, f"{where}png")).astype(np.float32)
  except BadInput:
    raise
  except ValueError as e:  # prepare_image: no digit in the image
    raise BadInput(f"{where}png: {e}") from e


def prepare_all(body: Union[Single, Batch]) -> tuple[np.ndarray, np.ndarray]:
  """A request's images float32 (N, 28, 28) in [0, 255] and numbers int32 (N,)."""
  items = body.items if isinstance(body, Batch) else [body]
  where = [f"items.{i}." if isinstance(body, Batch) else "" for i in range(len(items))]
  images = np.stack([prepare(item, w) for item, w in zip(items, where)])
  numbers = np.array([item.number for item in items], np.int32)
  return images, numbers


def predictions(digit_probs: np.ndarray, sum_probs: np.ndarray,
                images: Optional[np.ndarray]) -> list[Prediction]:
  """The answers for (N, 10) and (N, 19) probabilities; images (N, 28, 28) or None."""
  out = []
  for i in range(len(digit_probs)):
    out.append(Prediction(
        digit=int(np.argmax(digit_probs[i])), sum=int(np.argmax(sum_probs[i])),
        digit_probs=digit_probs[i].tolist(), sum_probs=sum_probs[i].tolist(),
        image=None if images is None else np.round(images[i]).astype(np.uint8).tolist()))
  return out
