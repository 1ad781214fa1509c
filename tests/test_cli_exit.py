"""The command line's fast exit (``remote_runner.cli.finish``): what a normal exit does that matters.

The entry points end the process with ``os._exit`` once the command is done,
skipping the interpreter's teardown; these tests hold it to everything else a
normal exit does. No hosts needed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap


def _run(body: str) -> subprocess.CompletedProcess:
    code = "from remote_runner.cli import finish\n" + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_the_status_buffered_output_threads_and_atexit_functions_all_survive_a_fast_exit(tmp_path):
    marker = tmp_path / "written-by-a-thread"
    done = _run(f"""
        import atexit, logging, sys, threading, time
        from concurrent.futures import ThreadPoolExecutor
        sys.stdout.write("buffered, never flushed by hand\\n")
        logging.basicConfig(stream=sys.stderr, format="%(message)s")
        logging.getLogger().error("logged")
        atexit.register(lambda: sys.stdout.write("atexit ran\\n"))
        def late():
            time.sleep(0.3)
            open({str(marker)!r}, "w").write("done")
        threading.Thread(target=late).start()  # not a daemon: a normal exit waits for it
        pool = ThreadPoolExecutor(1)
        pool.submit(lambda: (time.sleep(0.2), sys.stdout.write("pool job ran\\n")))
        finish(7)
        sys.stdout.write("never reached\\n")
    """)
    assert done.returncode == 7, done.stderr
    assert done.stdout.splitlines() == ["buffered, never flushed by hand", "pool job ran", "atexit ran"]
    assert done.stderr.strip() == "logged"
    assert marker.read_text() == "done"


def test_no_status_is_zero_and_a_closed_stdout_falls_back_to_a_normal_exit():
    assert _run("finish(None)").returncode == 0
    # stdout already closed: flushing it fails, so the normal exit takes over with the same status
    done = _run("""
        import os, sys
        sys.stdout.write("x")
        os.close(1)
        finish(3)
    """)
    assert done.returncode == 3, done
