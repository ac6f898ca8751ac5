"""Damaged or hostile activation files: one-line errors from `info`, `train` and the analyze reader, never a
traceback — wrong attr types, negative counts, a 1-D dataset, corrupt object headers, out-of-vocabulary ids."""

import json

import h5py
import numpy as np
import pytest

from sae_toolkit import cli
from sae_toolkit.activations.format import check_token_ids
from sae_toolkit.activations.info import describe
from sae_toolkit.activations.reader import ActsReader
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.model.loading import load_tokenizer


def write_acts(path, *, attrs=None, acts=None, tokens=None, libver="earliest"):
    """A hand-made 2-sequence, context-4, d=3 activation file; ``attrs``/``acts``/``tokens`` override parts."""
    with h5py.File(path, "w", libver=libver) as f:
        f.attrs.update(format="sae_toolkit.activations", format_version=1, context_size=4, n_seqs=2,
                       n_seqs_target=2, config=json.dumps({"tokens": 8}), model="tiny-llama", tokenizer="tiny-llama",
                       bos_token_id=0, eos_token_id=1)
        f.attrs.update(attrs or {})
        f["tokens"] = np.array([[0, 5, 6, 7], [0, 8, 9, 10]], np.int32) if tokens is None else tokens
        dset = f.create_dataset("acts/h", data=np.ones((8, 3), np.float16) if acts is None else acts)
        dset.attrs.update(hookpoint="h", module="m", io="output", d=3, dtype=str(dset.dtype))
    return path


def corrupt_last_object_header(path):
    """Flip a byte inside the last v2 object header (acts/h): its checksum no longer matches."""
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"OHDR")
    assert at > 0
    raw[at + 8] ^= 0xFF
    path.write_bytes(bytes(raw))


CASES = {
    "context_size of the wrong type": (dict(attrs={"context_size": "four"}),
                                       "root attr context_size='four', not an integer"),
    "negative n_seqs": (dict(attrs={"n_seqs": -5}), "root attr n_seqs=-5, not an integer >= 0"),
    "config not JSON": (dict(attrs={"config": "{oops"}), "config that is not a JSON object"),
    "config of the wrong type": (dict(attrs={"config": 7}), "config that is not a JSON object"),
    "1-D activations": (dict(acts=np.ones(24, np.float16)), r"acts/h .* has shape \(24,\); expected"),
}


def make(tmp_path, case):
    kw, message = CASES[case] if case in CASES else ({}, None)
    path = write_acts(tmp_path / "a.h5", libver="latest" if case == "corrupt header" else "earliest", **kw)
    if case == "corrupt header":
        corrupt_last_object_header(path)
        message = "is damaged and cannot be read .*re-create it with `sae-toolkit cache`"
    return path, message


@pytest.mark.parametrize("case", [*CASES, "corrupt header"])
def test_info_train_and_reader_give_one_line(tmp_path, capsys, case):
    path, message = make(tmp_path, case)
    with pytest.raises(SAEToolkitError, match=message):
        describe(str(path))
    with pytest.raises(SAEToolkitError, match=message):
        ActsReader(path, "h", tokenizer=None)  # what analyze reads through
    for argv in (["info", str(path)],
                 ["train", str(path), "--hookpoint", "h", "--arch", "topk", "--k", "2", "--out", str(tmp_path / "r")]):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err


def test_info_of_a_folder_says_folder(tmp_path):
    with pytest.raises(SAEToolkitError, match="is a folder, not an activation file"):
        describe(str(tmp_path))


def test_token_ids_outside_the_vocabulary(tmp_path):
    tokenizer = load_tokenizer("tiny-llama")
    bad = np.array([[0, 5, 6, 7], [0, 8, len(tokenizer) + 3, 10]], np.int32)
    path = write_acts(tmp_path / "a.h5", tokens=bad)
    message = rf"holds token id {len(tokenizer) + 3} \(sequence 1\), outside the vocabulary of {len(tokenizer)}"
    with ActsReader(path, "h", tokenizer=tokenizer) as reader:
        with pytest.raises(SAEToolkitError, match=message):
            list(reader.chunks(2))
        with pytest.raises(SAEToolkitError, match=message):
            reader.tokens([1, 0])
        assert reader.tokens([0]).shape == (1, 4)  # the good sequence still reads
    with pytest.raises(SAEToolkitError, match="holds token id -1 \\(sequence 4\\)"):
        check_token_ids(np.array([[3, -1]]), 10, "x.h5", first_seq=4)
    check_token_ids(np.array([[0, 9]]), 10, "x.h5")  # in range: fine


def test_info_on_a_file_another_process_writes(tmp_path, capsys):
    import subprocess
    import sys

    path = write_acts(tmp_path / "a.h5")
    holder = subprocess.Popen([sys.executable, "-c", "import h5py, sys; f = h5py.File(sys.argv[1], 'r+'); "
                               "print('open', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        assert cli.main(["info", str(path)]) == 1
        err = capsys.readouterr().err
        assert err == (f"error: {str(path)!r} is locked by another process (a `sae-toolkit cache` still writing "
                       "it?); wait for it to finish\n")
    finally:
        holder.communicate("", timeout=30)
    assert "stored:       2 sequences" in describe(str(path))
