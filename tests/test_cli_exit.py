"""`promptrec`'s entry point exits with main()'s code after the interpreter's own exit
steps (threads joined, exit handlers run), skipping only the native teardown that can
abort after a pyarrow read (services.launch.cli.run)."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import atexit, threading, time
from services.launch import cli

def late():
    time.sleep(0.3)
    print("thread done", flush=True)

atexit.register(lambda: print("handler ran", flush=True))
cli.main = lambda: (threading.Thread(target=late).start(), 3)[1]
cli.run()
print("not reached")
"""


def test_run_exits_with_mains_code_after_threads_and_exit_handlers():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 3, done.stderr
    assert done.stdout.splitlines() == ["thread done", "handler ran"]
