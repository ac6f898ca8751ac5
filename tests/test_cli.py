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
