"""Corpus specs and packing: every file kind gives the same documents; windows match a naive packing."""

import json

import numpy as np
import pandas as pd
import pytest
from _cache_helpers import reference_windows

from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.model.corpus import open_corpus, token_windows, window_batches
from sae_toolkit.model.loading import byte_tokenizer

DOCS = ["First document.\nIt has two lines.", "Second one, ünïcode ✓.", "Third: " + "long text " * 40]


@pytest.fixture
def files(tmp_path):
    paths = {}
    paths["txt"] = tmp_path / "c.txt"
    paths["txt"].write_text("\n\n".join(DOCS) + "\n\n\n")
    paths["jsonl"] = tmp_path / "c.jsonl"
    paths["jsonl"].write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(DOCS)))
    frame = pd.DataFrame({"id": range(3), "body": DOCS})
    paths["csv"] = tmp_path / "c.csv"
    frame.to_csv(paths["csv"], index=False)
    paths["parquet"] = tmp_path / "c.parquet"
    frame.to_parquet(paths["parquet"])
    return paths


@pytest.mark.parametrize("kind", ["txt", "jsonl", "csv", "parquet"])
def test_local_files_give_the_documents_in_order(files, kind):
    assert list(open_corpus(str(files[kind]))) == DOCS


def test_save_to_disk_folder_with_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": DOCS}),
            "test": datasets.Dataset.from_dict({"content": DOCS[:1]}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    assert list(open_corpus(str(tmp_path / "ds"))) == DOCS
    assert list(open_corpus(str(tmp_path / "ds"), split="test")) == DOCS[:1]
    with pytest.raises(SAEToolkitError, match="split 'validation' is not in .*train, test"):
        open_corpus(str(tmp_path / "ds"), split="validation")


def test_builtin_pydoc_is_real_text_in_a_fixed_order():
    first = list(open_corpus("builtin:pydoc"))
    assert len(first) > 50 and sum(map(len, first)) > 300_000
    assert first == list(open_corpus("builtin:pydoc"))


def test_text_column_choice_and_errors(files):
    assert list(open_corpus(str(files["csv"]), text_column="body")) == DOCS
    with pytest.raises(SAEToolkitError, match="text column 'txt' is not in .*columns are: id, text"):
        open_corpus(str(files["jsonl"]), text_column="txt")
    files["csv"].write_text("a,b\n1,x\n")
    with pytest.raises(SAEToolkitError, match=r"cannot guess the text column .*\(columns: a, b\); pass --text-column"):
        open_corpus(str(files["csv"]))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.jsonl", "does not exist"),
        ("./nowhere", "does not exist"),
        ("builtin:wiki", "unknown builtin dataset"),
    ],
)
def test_bad_dataset_specs(spec, message):
    with pytest.raises(SAEToolkitError, match=message):
        open_corpus(spec)


def test_unsupported_extension(tmp_path):
    (tmp_path / "x.docx").write_text("hi")
    with pytest.raises(SAEToolkitError, match="unsupported extension"):
        open_corpus(str(tmp_path / "x.docx"))


@pytest.mark.parametrize("context_size", [2, 7, 64])
def test_packing_matches_naive_reference(context_size):
    tok = byte_tokenizer()
    docs = list(open_corpus("builtin:pydoc"))[:5]
    got = np.concatenate(list(token_windows(docs, tok, context_size)))
    want = reference_windows(docs, tok, context_size)
    assert got.dtype == np.int32 and np.array_equal(got, want)
    assert (got[:, 0] == tok.bos_token_id).all()
    # Windows are fully packed: the only BOS ids are at position 0, and documents are joined by EOS.
    assert (got[:, 1:] != tok.bos_token_id).all()
    assert (got == tok.eos_token_id).sum() >= len(docs) - 1


def test_window_batches_are_exact_and_lose_nothing():
    blocks = [np.full((n, 4), i, np.int32) for i, n in enumerate([3, 0, 10, 1, 5])]
    batches = list(window_batches(iter(blocks), 4))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 3]
    assert np.array_equal(np.concatenate(batches), np.concatenate(blocks))


def test_tokenizer_without_bos_starts_windows_with_eos():
    from transformers import PreTrainedTokenizerFast

    tok = byte_tokenizer()
    no_bos = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|eos|>")
    windows = np.concatenate(list(token_windows(DOCS, no_bos, 16)))
    assert (windows[:, 0] == 1).all()


def test_unreadable_file_fails_before_reading(tmp_path, monkeypatch):
    from pathlib import Path

    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    real_open = Path.open

    def no_permission(self, *args, **kwargs):  # as chmod 000 for a non-root user (root reads anything)
        if self == corpus:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", no_permission)
    with pytest.raises(SAEToolkitError, match=r"cannot read dataset file .*c.txt': Permission denied; fix its "
                                              "permissions"):
        open_corpus(str(corpus))


def test_jsonl_bad_later_line_is_named(tmp_path):
    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(b'{"text": "one"}\n{"text": "two"}\n[1, 2]\n\xff\n')
    docs = open_corpus(str(corpus))
    assert next(docs) == "one" and next(docs) == "two"
    with pytest.raises(SAEToolkitError, match="c.jsonl line 3 is not a JSON object; fix or remove that line"):
        next(docs)
