"""README.md and docs/ against their sources: the headline, tables and logs of
`pretrained/`, the figures quoted from `results.json`, the links, the length.

The README's numbers are typed into it; these tests read them back and
compare them with what `pretrained/results.json` and `metrics.jsonl` say, as
`experiments/report.py` prints them, so that a new pretrained run without a
new README (or the reverse) fails here.
"""

import json
import re
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import report  # noqa: E402  pylint: disable=g-import-not-at-top

README = (REPO / "README.md").read_text()
DOCS = {p.name: p.read_text() for p in (REPO / "docs").glob("*.md")}
PRETRAINED = REPO / "pretrained"
MAX_README_LINES = 300


def _results(workdir=PRETRAINED) -> dict:
  return json.loads((workdir / "results.json").read_text())


def _rows(workdir=PRETRAINED) -> list:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if line.strip()]


def _pct(x: float) -> str:
  return f"{x:.2%}"


def _flat(text: str) -> str:
  """Prose with its line breaks and indentation as single spaces."""
  return " ".join(text.split())


def test_readme_is_a_front_door():
  lines = README.splitlines()
  assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines"
  first_screen = "\n".join(lines[:60])
  assert "![" in first_screen, "no picture in the README's first 60 lines"
  assert re.search(r"\*\*Headline: \d+\.\d+% joint accuracy\*\*", first_screen)


@pytest.mark.parametrize("words", [
    "data representation", "data generation", "combin", "loss", "evaluat", "result",
    "gpu", "training log"])
def test_each_point_of_the_assignment_has_a_heading(words):
  headings = [h.lower() for h in re.findall(r"^#+ (.+)$", README, re.M)]
  assert any(words in h for h in headings), f"no README heading mentions {words!r}"


def test_headline_is_the_pretrained_runs_swa_exhaustive_joint_accuracy():
  results = _results()
  headline = re.search(r"\*\*Headline: (\d+\.\d+%) joint accuracy\*\*", README).group(1)
  assert headline == _pct(results["swa"]["exhaustive"]["joint_acc"])
  assert results["config"]["seed"] == 0 and "SWA weights" in README[:3000]
  # The same figure leads docs/results.md.
  assert f"**{headline} exhaustive joint accuracy: the shipped pretrained run**" in \
      DOCS["results.md"]


def test_pretrained_tables_are_what_report_prints():
  results = _results()
  table = report.results_table(results)
  assert table in README, "README's pretrained table differs from report.py's"
  assert table in DOCS["results.md"]
  assert report.by_number_table(results) in DOCS["results.md"]


def test_the_products_of_two_accuracies_quoted_for_the_original_metric():
  swa = _results()["swa"]["exhaustive"]
  product = swa["digit_acc"] * swa["sum_acc"]
  assert (f"the product would give {_pct(product)} for the SWA weights "
          f"({_pct(swa['digit_acc'])} × {_pct(swa['sum_acc'])}), the count gives "
          f"{_pct(swa['joint_acc'])}") in _flat(README)


def test_wrong_sums_among_right_digits_quoted_from_results():
  results, cases = _results(), 100_000
  counts = []
  for weights in ("final", "swa"):
    ex = results[weights]["exhaustive"]
    right_digits = round(ex["digit_acc"] * cases)
    counts.append((round(right_digits * (1 - ex["sum_given_digit"])), right_digits))
  (final_wrong, final_right), (swa_wrong, swa_right) = counts
  sentence = (f"{final_wrong} of the {final_right:,} cases with the right digit for the final "
              f"weights and {swa_wrong} of the {swa_right:,} for the SWA weights")
  assert sentence in _flat(DOCS["design.md"])
  swa = results["swa"]["exhaustive"]
  wrong = round((1 - swa["joint_acc"]) * cases)
  misread = cases - round(swa["digit_acc"] * cases)
  assert (f"of the {wrong} exhaustive cases the pretrained SWA weights get wrong, {misread} "
          "have the wrong digit") in _flat(README)


def _quoted_console(text: str) -> list:
  lines = re.findall(r"^(?:epoch +\d+/\d+ .*|final  test joint .*|swa    test joint .*)$",
                     text, re.M)
  return [line for line in lines if "test loss" in line or "sum|digit" in line]


def test_training_logs_quoted_are_the_pretrained_runs_console():
  console = report.console_lines(_results(), _rows())
  quoted = _quoted_console(README)
  assert len(quoted) >= 5
  assert set(quoted) <= set(console), set(quoted) - set(console)
  assert console[-2:] == quoted[-2:]  # the final scores end both excerpts
  assert "\n".join(console) in DOCS["results.md"]  # the whole log there


def test_console_lines_are_what_the_cli_printed():
  """`report.console_lines` reproduces a log `python -m adder.train` wrote itself."""
  run = REPO / "docs" / "gpu-run-h200-original-recipe-rerun"
  logged = [line for line in (run / "train.log").read_text().splitlines()
            if line.startswith(("epoch ", "final ", "swa "))]
  assert report.console_lines(_results(run), _rows(run)) == logged


def test_predict_example_prints_what_the_readme_says():
  block = re.search(r"```bash\npython -m adder.predict (\S+) (\d)\n```\n\n```\n(.*?)```",
                    README, re.S)
  image, number, expected = block.groups()
  proc = subprocess.run([sys.executable, "-m", "adder.predict", image, number],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout == expected


def test_readme_test_command_is_what_ci_runs():
  assert re.search(r"^python -m pytest -q$", README, re.M)
  assert re.search(r"^python -m pytest -q$", (REPO / ".ci" / "run").read_text(), re.M)


def _slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  text = re.sub(r"[`*]", "", heading.strip().lower())
  return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


@pytest.mark.parametrize("name", ["README.md"] + [f"docs/{n}" for n in sorted(DOCS)])
def test_relative_links_and_anchors_resolve(name):
  path = REPO / name
  text = path.read_text()
  for target in re.findall(r"\]\(([^)\s]+)\)", text):
    if re.match(r"[a-z]+:", target):
      continue  # http(s), mailto
    file_part, _, anchor = target.partition("#")
    linked = (path.parent / file_part).resolve() if file_part else path
    assert linked.exists(), f"{name}: link to missing {target}"
    if anchor and linked.suffix == ".md":
      anchors = {_slug(h) for h in re.findall(r"^#+ (.+)$", linked.read_text(), re.M)}
      assert anchor in anchors, f"{name}: no heading #{anchor} in {file_part or name}"


def test_layout_names_every_module_and_script():
  layout = re.search(r"## Layout\n\n```\n(.*?)```", README, re.S).group(1)
  listed = {path.rstrip(".,") for path in re.findall(
      r"\b(?:adder|experiments|tests|docs|examples|pretrained)/[\w./-]*", layout)}
  for folder in ("adder", "experiments"):
    for source in sorted((REPO / folder).iterdir()):
      if source.suffix in (".py", ".cc", ".sh") and source.name != "__init__.py":
        assert f"{folder}/{source.name}" in listed, f"the Layout leaves out {folder}/{source.name}"
  for entry in listed:
    assert (REPO / entry.rstrip("/")).exists(), f"the Layout lists a missing {entry}"


def test_testing_doc_lists_every_test_file():
  listed = set(re.findall(r"^\| `(test_\w+\.py)` \|", DOCS["testing.md"], re.M))
  present = {p.name for p in (REPO / "tests").glob("test_*.py")}
  assert listed == present, (f"docs/testing.md lacks {sorted(present - listed)}, "
                             f"lists missing {sorted(listed - present)}")
