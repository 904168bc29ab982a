"""`--users` and `promptrec users`: a bad profile file fails at start, before any broker or
Ray starts or any record is sent, naming the file, the row and the column."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.launch.cli import main

BAD = 'user_id,text\nu-1,A hiker.\nu-2,"  "\n'  # row 1: empty text


@pytest.fixture
def bad_file(tmp_path):
    path = tmp_path / "users.csv"
    path.write_text(BAD)
    return str(path)


def test_serve_with_a_bad_users_file_fails_at_start_naming_file_row_and_column(
        tmp_path, bad_file):
    done = subprocess.run([sys.executable, "-m", "services.launch.cli", "serve", "--users",
                           bad_file, "--data-dir", str(tmp_path / "data")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"{bad_file}, row 1, column 'text': empty" in done.stderr
    assert "kafka ready" not in done.stderr + done.stdout  # nothing was started


def test_the_users_command_validates_the_file_before_sending(bad_file, capsys):
    # Port 1 refuses connections: reaching Kafka at all would fail differently (3).
    assert main(["users", bad_file, "--kafka-bootstrap", "127.0.0.1:1"]) == 2
    assert f"{bad_file}, row 1, column 'text'" in capsys.readouterr().err


def test_the_users_command_needs_a_file_or_deletes(capsys):
    assert main(["users", "--kafka-bootstrap", "127.0.0.1:1"]) == 2
    assert "give a profile file or --delete" in capsys.readouterr().err
