"""Labelled text for fine-tuning: GLUE-format task folders, and a built-in movie-sentence task.

GLUE folders are read as the user has them: the official GLUE layouts (``SST-2/train.tsv`` with a
``sentence<TAB>label`` header, headerless CoLA with four columns, MRPC's ``Quality ... #2 String`` header,
MNLI's ``dev_matched.tsv``, ...) and the common re-distributions of the same data (SentEval's headerless
``label<TAB>sentence`` or ``sentence<TAB>label``, MRPC or STS-B without their header).

The built-in tasks ``movies`` (binary) and ``movies-regression`` need no files: they are the 10,605
Rotten Tomatoes sentences with mean human sentiment scores (-4..4) that the ``vaderSentiment==3.3.2``
source distribution ships (MIT licence), fetched once with pip and cached in ``$WTACRS_CACHE`` (default
``~/.cache/wtacrs``). The binary label is the sign of the score (the 37 sentences scored exactly 0 are left
out); the split into train and eval is fixed.
"""

from __future__ import annotations

import io
import os
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

#: Seed of every data-side choice (the built-in split, subsets), so all methods and seeds see the same data.
DATA_SEED = 0

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_REQUIREMENT = "vaderSentiment==3.3.2"
_MOVIE_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_MOVIE_EVAL_SHARE = 0.2


class DataError(ValueError):
    """A task, folder or file that cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Task:
    """How to read one task. Column layouts: ``(text_a, text_b or None, label)`` by header name or by index."""

    name: str
    title: str
    score: str  # key of wtacrs.app.metrics.TASK_SCORE
    num_labels: int  # 1 = regression
    header: tuple[str, str | None, str] | None = None
    headerless: tuple[tuple[int, tuple[int, int | None, int]], ...] = ()  # (column count, layout); 0 = any
    label_names: tuple[str, ...] = ()  # string labels, in class-index order
    eval_files: tuple[str, ...] = ("dev.tsv",)
    folder_names: tuple[str, ...] = ()
    builtin: bool = False

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: int | float


@dataclass(frozen=True)
class TaskData:
    task: Task
    train: list[Example]
    eval: list[Example]
    source: str  # where the examples came from, for results files


_SINGLE = ((2, (-1, None, -1)),)  # two columns, label first or last: decided per file
TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task("sst2", "SST-2", "accuracy", 2, ("sentence", None, "label"), _SINGLE, folder_names=("SST-2", "SST2")),
        Task("mr", "MR", "accuracy", 2, ("sentence", None, "label"), _SINGLE, folder_names=("MR",)),
        Task("cola", "CoLA", "matthews", 2, ("sentence", None, "label"), _SINGLE + ((4, (3, None, 1)),),
             folder_names=("CoLA",)),
        Task("mrpc", "MRPC", "f1_accuracy", 2, ("#1 String", "#2 String", "Quality"), ((5, (3, 4, 0)),),
             folder_names=("MRPC",)),
        Task("rte", "RTE", "accuracy", 2, ("sentence1", "sentence2", "label"), ((4, (1, 2, 3)),),
             ("entailment", "not_entailment"), folder_names=("RTE",)),
        Task("stsb", "STS-B", "pearson_spearman", 1, ("sentence1", "sentence2", "score"), ((10, (7, 8, 9)),),
             folder_names=("STS-B", "STSB")),
        Task("qnli", "QNLI", "accuracy", 2, ("question", "sentence", "label"), ((4, (1, 2, 3)),),
             ("entailment", "not_entailment"), folder_names=("QNLI",)),
        Task("qqp", "QQP", "f1_accuracy", 2, ("question1", "question2", "is_duplicate"), ((6, (3, 4, 5)),),
             folder_names=("QQP",)),
        Task("mnli", "MNLI", "accuracy", 3, ("sentence1", "sentence2", "gold_label"), ((0, (8, 9, -1)),),
             ("entailment", "neutral", "contradiction"), ("dev_matched.tsv", "dev.tsv"), ("MNLI",)),
        Task("movies", "Movies", "accuracy", 2, builtin=True),
        Task("movies-regression", "Movies-R", "pearson_spearman", 1, builtin=True),
    )
}
DEFAULT_TASK = "movies"


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_task(name: str) -> Task:
    """The task called ``name``; case, dashes and underscores are ignored (``SST-2`` = ``sst2``)."""
    for task in TASKS.values():
        if _key(name) in {_key(task.name), _key(task.title)} | {_key(f) for f in task.folder_names}:
            return task
    raise DataError(f"task must be one of {', '.join(TASKS)}; got {name!r}")


def load_task(
    name: str,
    data_dir: str | os.PathLike | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
) -> TaskData:
    """Train and eval examples of task ``name``.

    GLUE tasks read ``data_dir``: the task's own folder (holding ``train.tsv`` and ``dev.tsv``) or a folder
    holding it (e.g. ``glue_data`` with ``SST-2/`` inside). ``max_train``/``max_eval`` keep a fixed random
    subset (the same for every caller).
    """
    task = get_task(name)
    for arg, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise DataError(f"{arg} must be a positive number of examples; got {value}")
    if task.builtin:
        if data_dir is not None:
            raise DataError(f"task {task.name} is built in and reads no files; leave out data_dir (got {data_dir})")
        train, eval_, source = _movie_split(task)
    else:
        if data_dir is None:
            raise DataError(
                f"task {task.name} reads GLUE-format files: pass a data folder holding {task.title}/train.tsv "
                f"and {task.title}/{task.eval_files[0]} (or the task folder itself)"
            )
        folder = find_task_folder(task, data_dir)
        eval_file = next((folder / f for f in task.eval_files if (folder / f).is_file()), None)
        if eval_file is None:
            raise DataError(f"{folder} has no eval file: expected one of {', '.join(task.eval_files)}")
        train, eval_ = read_tsv(task, folder / "train.tsv"), read_tsv(task, eval_file)
        source = str(folder)
    return TaskData(task, _subset(train, max_train), _subset(eval_, max_eval), source)


def find_task_folder(task: Task, data_dir: str | os.PathLike) -> Path:
    """``data_dir`` itself if it holds ``train.tsv``, else its sub-folder named after the task."""
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    if (root / "train.tsv").is_file():
        return root
    names = {_key(task.name), _key(task.title)} | {_key(f) for f in task.folder_names}
    for child in sorted(root.iterdir()):
        if child.is_dir() and _key(child.name) in names and (child / "train.tsv").is_file():
            return child
    found = sorted(p.name for p in root.iterdir())
    raise DataError(
        f"no {task.title} data in {root}: expected train.tsv there or in a sub-folder named "
        f"{' or '.join(task.folder_names)}; found {', '.join(found) or 'nothing'}"
    )


def read_tsv(task: Task, path: Path) -> list[Example]:
    """Examples of one tab-separated file, in file order. A line that does not fit raises ``DataError``
    naming the file and line number."""
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = [line.rstrip("\r\n") for line in f]
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise DataError(f"{path} is empty")
    fields = lines[first].split("\t")
    if task.header and task.header[2] in fields and task.header[0] in fields:
        a, b, label = task.header
        layout = (fields.index(a), fields.index(b) if b else None, fields.index(label))
        start = first + 1
    else:
        layout = _headerless_layout(task, path, first + 1, fields)
        start = first
    examples = []
    for number, line in enumerate(lines[start:], start=start + 1):
        if line.strip():
            examples.append(_parse_line(task, path, number, line.split("\t"), layout))
    if not examples:
        raise DataError(f"{path} has a header but no examples")
    return examples


def _headerless_layout(task: Task, path: Path, number: int, fields: list[str]) -> tuple[int, int | None, int]:
    for count, layout in task.headerless:
        if count == len(fields) or count == 0:
            if layout == (-1, None, -1):  # one sentence and a label, either way round
                if _try_label(task, fields[0]) is not None:
                    return 1, None, 0
                if _try_label(task, fields[1]) is not None:
                    return 0, None, 1
                break
            return layout
    expected = "; ".join(
        "label<TAB>sentence or sentence<TAB>label" if layout == (-1, None, -1) else f"{count} columns"
        for count, layout in task.headerless
    )
    header = "<TAB>".join(c for c in task.header if c) if task.header else None
    raise DataError(
        f"{path}:{number}: cannot read this as {task.title} data: found {len(fields)} tab-separated columns; "
        f"expected a header line ({header}) or headerless lines of {expected}"
    )


def _try_label(task: Task, text: str) -> int | float | None:
    text = text.strip()
    if task.is_regression:
        try:
            return float(text)
        except ValueError:
            return None
    if text in task.label_names:
        return task.label_names.index(text)
    if text.lstrip("-").isdigit() and 0 <= int(text) < task.num_labels:
        return int(text)
    return None


def _parse_line(task: Task, path: Path, number: int, fields: list[str], layout) -> Example:
    a, b, label_col = layout
    needed = max(c for c in (a, b, label_col) if c is not None)
    if len(fields) <= needed:
        raise DataError(
            f"{path}:{number}: expected at least {needed + 1} tab-separated columns, found {len(fields)}: "
            f"{_clip(chr(9).join(fields))!r}"
        )
    label = _try_label(task, fields[label_col])
    if label is None:
        allowed = "a number" if task.is_regression else ", ".join(task.label_names or map(str, range(task.num_labels)))
        raise DataError(
            f"{path}:{number}: label {_clip(fields[label_col])!r} (column {label_col % len(fields) + 1}) "
            f"is not a {task.title} label; expected {allowed}"
        )
    return Example(fields[a], fields[b] if b is not None else None, label)


def _clip(text: str, width: int = 80) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def _subset(examples: list[Example], limit: int | None) -> list[Example]:
    if limit is None or limit >= len(examples):
        return examples
    return [examples[i] for i in random.Random(DATA_SEED).sample(range(len(examples)), limit)]


# ---------------------------------------------------------------------------------------------- built-in task


def cache_dir() -> Path:
    """Where fetched data is kept: ``$WTACRS_CACHE``, else ``~/.cache/wtacrs``."""
    return Path(os.environ.get("WTACRS_CACHE") or Path.home() / ".cache" / "wtacrs").expanduser()


def movie_sentences() -> list[tuple[float, str]]:
    """The 10,605 (score, sentence) pairs of the VADER movie-sentence ground truth, in file order."""
    sdist = cache_dir() / VADER_SDIST
    if not sdist.is_file():
        _download_sdist(sdist.parent)
    try:
        with tarfile.open(sdist) as outer:
            inner = outer.extractfile("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz").read()
        with tarfile.open(fileobj=io.BytesIO(inner)) as resources:
            text = resources.extractfile(_MOVIE_MEMBER).read().decode("utf-8")
    except (tarfile.TarError, KeyError, AttributeError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{sdist} is not a usable {VADER_REQUIREMENT} source archive ({e}); delete it to fetch again")
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            fields = line.split("\t")
            try:
                pairs.append((float(fields[1]), fields[2]))
            except (IndexError, ValueError):
                raise DataError(f"{sdist}:{_MOVIE_MEMBER}:{number}: expected id<TAB>score<TAB>sentence") from None
    return pairs


def _download_sdist(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               VADER_REQUIREMENT, "-d", str(target)]
    print(f"fetching the movie sentences once: {' '.join(command)}", file=sys.stderr)
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0 or not (target / VADER_SDIST).is_file():
        raise DataError(
            f"could not fetch {VADER_REQUIREMENT} with pip (needed once for the built-in movie task):\n"
            f"{result.stderr.strip()[-500:]}\nOn a machine with access to PyPI run\n  python {' '.join(command[1:-1])} DIR\n"
            f"and copy {VADER_SDIST} to {target} (or set WTACRS_CACHE to the folder holding it)"
        )


def _movie_split(task: Task) -> tuple[list[Example], list[Example], str]:
    pairs = movie_sentences()
    if task.is_regression:
        examples = [Example(sentence, None, score) for score, sentence in pairs]
    else:
        examples = [Example(sentence, None, int(score > 0)) for score, sentence in pairs if score != 0]
    order = list(range(len(examples)))
    random.Random(DATA_SEED).shuffle(order)
    n_eval = round(_MOVIE_EVAL_SHARE * len(examples))
    source = f"{VADER_REQUIREMENT} sdist: {_MOVIE_MEMBER}"
    return [examples[i] for i in order[n_eval:]], [examples[i] for i in order[:n_eval]], source
