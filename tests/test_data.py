import io
import tarfile
from pathlib import Path

import pytest

from wtacrs.app import data
from wtacrs.app.data import DataError, load_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside the project")


@needs_shared
@pytest.mark.parametrize(
    "task, folder, n_train, n_eval, first_label",
    [
        ("sst2", "senteval", 6920, 1821, 1),  # label<TAB>sentence
        ("MR", "senteval/MR", 8529, 2133, 1),
        ("CoLA", "senteval", 8551, 516, 1),  # sentence<TAB>label
        ("rte", "glue-pairs", 1244, 139, 0),  # GLUE header, string labels
        ("MRPC", "glue-pairs", 2576, 1500, 1),  # GLUE columns without header
        ("STS-B", "glue-pairs", 4249, 1500, 5.0),
    ],
)
def test_reads_the_shared_folders(task, folder, n_train, n_eval, first_label):
    loaded = load_task(task, SHARED / folder)
    assert (len(loaded.train), len(loaded.eval)) == (n_train, n_eval)
    assert loaded.train[0].label == first_label
    assert all(e.text_a for e in loaded.train)
    assert (loaded.train[0].text_b is None) == (task in ("sst2", "MR", "CoLA"))


# The official GLUE layouts (glue_data/<TASK>/train.tsv as GLUE's download script writes them).
OFFICIAL = {
    "SST-2": ("sentence\tlabel\nit 's a charming journey \t1\nbad .\t0\n", ("it 's a charming journey ", None, 1)),
    "CoLA": ("gj04\t1\t\tOur friends won't buy this.\ngj04\t0\t*\tThey drank the pub.\n",
             ("Our friends won't buy this.", None, 1)),
    "MRPC": ("Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA cat sat.\tA cat was sitting.\n",
             ("A cat sat.", "A cat was sitting.", 1)),
    "STS-B": ("index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
              "0\tmain-captions\tMSRvid\t2012test\t0001\tnone\tnone\tA plane.\tAn air plane.\t5.000\n",
              ("A plane.", "An air plane.", 5.0)),
    "QNLI": ("index\tquestion\tsentence\tlabel\n0\tWho?\tHim.\tnot_entailment\n", ("Who?", "Him.", 1)),
    "QQP": ("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n7\t1\t2\tWhy?\tHow come?\t1\n",
            ("Why?", "How come?", 1)),
    "MNLI": ("index\tpromptID\tpairID\tgenre\ts1b\ts2b\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label\n"
             "0\t1\t1e\tgov\t(a)\t(b)\t(a)\t(b)\tA man.\tA person.\tneutral\tentailment\n",
             ("A man.", "A person.", 0)),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_reads_official_glue_layouts(tmp_path, name):
    text, (a, b, label) = OFFICIAL[name]
    folder = tmp_path / "glue_data" / name
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(text)
    (folder / ("dev_matched.tsv" if name == "MNLI" else "dev.tsv")).write_text(text)
    loaded = load_task(name, tmp_path / "glue_data")
    assert loaded.train[0] == data.Example(a, b, label)
    assert loaded.eval == loaded.train


def test_malformed_line_names_file_and_line(tmp_path):
    (tmp_path / "train.tsv").write_text("1\tgood film\n0\tbad film\n1 no tab here\n")
    (tmp_path / "dev.tsv").write_text("1\tfine\n")
    with pytest.raises(DataError, match=r"train\.tsv:3: expected at least 2 tab-separated columns, found 1"):
        load_task("sst2", tmp_path)
    (tmp_path / "train.tsv").write_text("1\tgood film\n7\tbad film\n")
    with pytest.raises(DataError, match=r"train\.tsv:2: label '7' \(column 1\) is not a SST-2 label; expected 0, 1"):
        load_task("sst2", tmp_path)
    (tmp_path / "train.tsv").write_text("a\tb\tc\n")
    with pytest.raises(DataError, match=r"train\.tsv:1: cannot read this as SST-2 data: found 3 tab-separated"):
        load_task("sst2", tmp_path)


def test_unknown_task_and_missing_folders(tmp_path):
    with pytest.raises(DataError, match="task must be one of sst2, mr, cola.*; got 'sst3'"):
        load_task("sst3", tmp_path)
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        load_task("rte", tmp_path / "nowhere")
    with pytest.raises(DataError, match="reads GLUE-format files: pass a data folder"):
        load_task("rte")
    (tmp_path / "SST-2").mkdir()
    with pytest.raises(DataError, match=r"no RTE data in .*: expected train\.tsv .* named RTE; found SST-2"):
        load_task("rte", tmp_path)
    (tmp_path / "SST-2" / "train.tsv").write_text("1\tfine\n")
    with pytest.raises(DataError, match="has no eval file: expected one of dev.tsv"):
        load_task("sst2", tmp_path)
    with pytest.raises(DataError, match="max_train must be a positive number of examples; got 0"):
        load_task("sst2", tmp_path, max_train=0)


@needs_shared
def test_subsets_are_fixed():
    a = load_task("sst2", SHARED / "senteval", max_train=50, max_eval=20)
    b = load_task("sst2", SHARED / "senteval", max_train=50, max_eval=20)
    assert (len(a.train), len(a.eval)) == (50, 20)
    assert a.train == b.train and a.eval == b.eval
    assert {e.label for e in a.train} == {0, 1}


def _fake_vader_sdist(path: Path, rows: list[str]) -> None:
    """An archive laid out like the vaderSentiment 3.3.2 sdist, with ``rows`` as the movie ground truth."""
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        payload = "\r\n".join(rows).encode()
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(path, mode="w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))


def test_builtin_movie_task_from_cached_sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("WTACRS_CACHE", str(tmp_path))
    rows = [f"{i}\t{(-1) ** i * (i % 4) / 2}\tsentence number {i}" for i in range(1, 101)]
    _fake_vader_sdist(tmp_path / data.VADER_SDIST, rows)
    movies = load_task("movies")
    zero = sum(i % 4 == 0 for i in range(1, 101))
    assert len(movies.train) + len(movies.eval) == 100 - zero  # score 0 has no sign: left out
    assert len(movies.eval) == round(0.2 * (100 - zero))
    for e in movies.train + movies.eval:
        i = int(e.text_a.split()[-1])
        assert e.label == int((-1) ** i * (i % 4) > 0)
    assert load_task("movies") == movies  # fixed split
    regression = load_task("movies-regression")
    assert len(regression.train) + len(regression.eval) == 100
    with pytest.raises(DataError, match="is built in and reads no files"):
        load_task("movies", tmp_path)


def test_builtin_movie_task_broken_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("WTACRS_CACHE", str(tmp_path))
    (tmp_path / data.VADER_SDIST).write_bytes(b"not an archive")
    with pytest.raises(DataError, match="is not a usable vaderSentiment==3.3.2 source archive"):
        load_task("movies")
    _fake_vader_sdist(tmp_path / data.VADER_SDIST, ["1\t2.0\tfine", "2\tbroken"])
    with pytest.raises(DataError, match=r"GroundTruth\.txt:2: expected id<TAB>score<TAB>sentence"):
        load_task("movies")


def test_builtin_movie_task_without_network_says_how_to_fetch(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("WTACRS_CACHE", str(tmp_path))
    calls = []

    def pip_fails(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (no network)")

    monkeypatch.setattr(data.subprocess, "run", pip_fails)
    with pytest.raises(DataError, match=r"(?s)could not fetch vaderSentiment==3\.3\.2 with pip .*no network.*"
                                        r"\n  python -m pip download --no-deps --no-binary :all: vaderSentiment==3\.3\.2 -d DIR"
                                        r"\nand copy vaderSentiment-3\.3\.2\.tar\.gz to "):
        load_task("movies")
    assert calls[0][1:] == ["-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "vaderSentiment==3.3.2",
                            "-d", str(tmp_path)]
