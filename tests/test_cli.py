"""The CLI front: sizes, help, and one-line errors instead of tracebacks."""

import pytest

from sae_toolkit.cli import build_parser, main
from sae_toolkit.errors import SAEToolkitError
from sae_toolkit.units import parse_size, resolve_device


@pytest.mark.parametrize(
    ("text", "value"),
    [("64k", 64_000), ("200K", 200_000), ("1M", 1_000_000), ("10m", 10_000_000), ("1B", 10**9), ("1.5k", 1500),
     ("123", 123)],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "k", "12q", "-5", "0", "1.2345k"])
def test_parse_size_rejects(text):
    with pytest.raises(SAEToolkitError, match="size"):
        parse_size(text)


def test_resolve_device():
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in {"cpu", "cuda"}
    with pytest.raises(SAEToolkitError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")


def test_every_contract_command_exists():
    parser = build_parser()
    for argv in (["cache", "--model", "m", "--hookpoint", "h", "--dataset", "d", "--tokens", "2k", "--out", "o.h5"],
                 ["info", "f.h5"], ["train", "f.h5", "--hookpoint", "h", "--arch", "topk", "--out", "r"],
                 ["analyze", "r", "--acts", "f.h5", "--out", "rep"],
                 ["export", "s", "--format", "saelens", "--out", "o"],
                 ["demo"]):
        args = parser.parse_args(argv)
        assert args.command == argv[0]
    assert parser.parse_args(["cache", "--model", "m", "--hookpoint", "h", "--dataset", "d",
                                         "--tokens", "20k", "--out", "o.h5"]).tokens == 20_000


def test_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["cache", "--model", "m", "--hookpoint", "h", "--dataset", "d", "--tokens", "lots", "--out", "o.h5"])
    assert exc.value.code == 2
    assert "cannot read size 'lots'" in capsys.readouterr().err


def test_library_error_is_one_line(capsys, tmp_path):
    missing = tmp_path / "nope.h5"
    assert main(["info", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "nope.h5" in err


def test_sequence_ranges():
    parser = build_parser()
    args = parser.parse_args(["train", "f.h5", "--hookpoint", "h", "--arch", "relu", "--out", "r", "--seqs", "0:800"])
    assert args.seqs == (0, 800)
    args = parser.parse_args(["analyze", "r", "--acts", "f.h5", "--out", "o", "--seqs", "800:890", "--ce-windows", "8"])
    assert (args.seqs, args.ce_windows) == ((800, 890), 8)
    for bad in ("800", "5:2", "a:b", "-1:3"):
        with pytest.raises(SystemExit):
            parser.parse_args(["analyze", "r", "--acts", "f.h5", "--out", "o", "--seqs", bad])


def test_package_reexports_resolve():
    import sae_toolkit

    for name in sae_toolkit.__all__:
        assert getattr(sae_toolkit, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        sae_toolkit.no_such_name  # noqa: B018


def _info_raises(monkeypatch, error):
    from sae_toolkit.activations import info

    def fail(path):
        raise error

    monkeypatch.setattr(info, "describe", fail)


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (OSError(28, "No space left on device", "/data/x.h5"),
         "disk full writing /data/x.h5; free space or pick an --out on another disk"),
        (OSError(30, "Read-only file system", "/ro/run"), "/ro/run is on a read-only filesystem; pick an --out"),
        (PermissionError(13, "Permission denied", "/root/run"), "permission denied for /root/run; pick an --out you"),
        (FileExistsError(17, "File exists", "/tmp/nowhere-i10a/x"), "/tmp/nowhere-i10a/x already exists; pick another"),
        (NotADirectoryError(20, "Not a directory", __file__ + "/x/y"),
         f"{__file__}/x/y: {__file__} is a regular file, not a folder"),
        # h5py's own OSError: no errno attribute, the errno and the file name inside the message
        (OSError("Unable to synchronously create file (unable to open file: name = '/data/y.h5', errno = 28, "
                 "error message = 'No space left on device')"), "disk full writing /data/y.h5"),
        (MemoryError("Unable to allocate 64.0 GiB"), "out of memory (Unable to allocate 64.0 GiB); lower --batch-size"),
        (__import__("pickle").UnpicklingError("Weights only load failed.\nmore"), "refused to unpickle a file"),
        (ValueError("something nobody checked"),
         "unexpected ValueError: something nobody checked (rerun with --debug for the traceback)"),
    ],
)
def test_top_level_handler_is_one_line_exit_1(monkeypatch, capsys, error, message):
    _info_raises(monkeypatch, error)
    assert main(["info", "f.h5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err


def test_exit_codes_and_debug_traceback(monkeypatch, capsys):
    from sae_toolkit.errors import RunFailure

    _info_raises(monkeypatch, RunFailure("the lock is held"))
    assert main(["info", "f.h5"]) == 1
    assert capsys.readouterr().err == "error: the lock is held\n"
    _info_raises(monkeypatch, SAEToolkitError("bad value"))
    assert main(["info", "f.h5"]) == 2  # usage errors keep exit 2
    assert capsys.readouterr().err == "error: bad value\n"
    _info_raises(monkeypatch, OSError(28, "No space left on device", "/d/x.h5"))
    for argv in (["--debug", "info", "f.h5"], ["info", "f.h5", "--debug"]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1].startswith("error: disk")
    monkeypatch.setenv("SAE_TOOLKIT_DEBUG", "1")
    assert main(["info", "f.h5"]) == 1
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("SAE_TOOLKIT_DEBUG", "0")
    assert main(["info", "f.h5"]) == 1
    assert "Traceback" not in capsys.readouterr().err


def test_out_under_a_regular_file_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    assert main(["cache", "--model", "tiny-llama", "--hookpoint", "mlp_out.1", "--dataset", "builtin:pydoc",
                 "--tokens", "64", "--context-size", "32", "--device", "cpu", "--out", str(blocker / "a.h5")]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {blocker} is a file where a folder is needed; pick another --out (nothing was changed)\n"
    assert blocker.read_text() == "mine"


def test_negative_seed_is_a_usage_error(tmp_path, capsys):
    assert main(["train", str(tmp_path / "a.h5"), "--hookpoint", "h", "--arch", "topk", "--out", str(tmp_path / "r"),
                 "--seed", "-1"]) == 2
    assert capsys.readouterr().err == "error: seed=-1 must be an integer from 0 to 2**32 - 1, e.g. --seed 0\n"


def test_os_errors_inside_other_exceptions_and_the_out_hint():
    from sae_toolkit.errors import failure_message

    class SafetensorError(Exception):  # safetensors' Rust error: no errno attribute, no file name
        pass

    message, code = failure_message(SafetensorError("Error while serializing: I/O error: No space left on device "
                                                    "(os error 28)"), "/runs/r1")
    assert (message, code) == ("disk full writing /runs/r1; free space or pick an --out on another disk, then rerun "
                               "(cache and train continue with --resume)", 1)
    assert failure_message(OSError(30, "Read-only file system"), "/ro/x")[0].startswith("/ro/x is on a read-only")
def test_output_safety_flags_parse():
    parser = build_parser()
    assert parser.parse_args(["train", "f.h5", "--hookpoint", "h", "--arch", "topk", "--out", "r", "--force"]).force
    a = parser.parse_args(["analyze", "r", "--acts", "f.h5", "--out", "rep", "--force", "--allow-mismatch"])
    assert a.force and a.allow_mismatch
    assert not parser.parse_args(["analyze", "r", "--acts", "f.h5", "--out", "rep"]).allow_mismatch
    assert parser.parse_args(["export", "s", "--format", "saelens", "--out", "o", "--force"]).force
    assert parser.parse_args(["demo", "--force"]).force and not parser.parse_args(["demo"]).force


def test_out_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "sae").mkdir()
    (tmp_path / "taken").write_text("x")
    assert main(["export", str(tmp_path / "sae"), "--format", "saelens", "--out", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --out ") and "is a file" in err and "\n" not in err
    assert (tmp_path / "taken").read_text() == "x"
