"""snaplearn-client's own refusals: said in words on stderr with an exit code, never a traceback
(issue 21, "CLI and launcher"). Nothing here reaches a server: each refusal comes before one."""

from __future__ import annotations

from pathlib import Path

import pytest

from snaplearn_client import cli


@pytest.mark.parametrize("count", [1, 2], ids=["one-photo", "several-photos"])
def test_classify_of_a_missing_file_says_which_file_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], count: int
) -> None:
    present = tmp_path / "present.png"
    present.write_bytes(b"\x89PNG")
    missing = tmp_path / "missing.jpg"
    images = [str(missing)] if count == 1 else [str(present), str(missing)]
    # A target nothing listens on: the refusal must come before any connection is tried.
    rc = cli.main(["--vision", "127.0.0.1:1", "--timeout", "1", "classify", *images, "--user", "u"])
    assert rc == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == f"error: cannot read {missing}: No such file or directory"
    assert "Traceback" not in captured.err and captured.out == ""


def test_classify_of_a_folder_says_it_is_not_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["--vision", "127.0.0.1:1", "classify", str(tmp_path), "--user", "u"]) == 2
    assert capsys.readouterr().err.strip() == f"error: cannot read {tmp_path}: Is a directory"
