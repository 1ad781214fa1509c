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


def test_sigterm_unwinds_a_command_as_ctrl_c_does_and_exits_143(tmp_path):
    done = _run("""
        import os, signal, sys, time
        from remote_runner.cli import run_guarded, setup_logging
        from remote_runner.errors import EXIT_INTERRUPTED
        from remote_runner.upload import Cancelled
        setup_logging()
        def work():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            finally:
                print("cleaned up", flush=True)
            return 0
        first = run_guarded(work)
        def cancelled_copy():  # a copy cancelled by it: its own 130 becomes 143 as well
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(30)
            except KeyboardInterrupt:
                raise Cancelled("copy cancelled")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        second = run_guarded(cancelled_copy)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # ignored by whoever started us: stays so
        os.kill(os.getpid(), signal.SIGTERM)
        third = run_guarded(lambda: 5)
        print(first, second, third, EXIT_INTERRUPTED)
        finish(0)
    """)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["cleaned up", "143 143 5 130"]
    assert done.stderr.splitlines() == ["ERROR: terminated (SIGTERM)"] * 2


def test_a_command_killed_while_it_connects_exits_143(tmp_path):
    """``remote-runner exec`` to a host that accepts and never speaks SSH, then ``kill``."""
    import os
    import signal
    import socket
    import time

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    config = tmp_path / "ssh_config"
    config.write_text(f"Host mute\n  HostName 127.0.0.1\n  Port {server.getsockname()[1]}\n")
    env = {**os.environ, "REMOTE_RUNNER_STANDBY": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "remote_runner", "exec", "-F", str(config),
                             "--accept-new-host-keys", "mute", "true"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        server.settimeout(30)
        peer, _ = server.accept()  # it is connecting: waiting for the banner that never comes
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)  # (the handshake thread is given 10 s to end)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        server.close()
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "ERROR: terminated (SIGTERM)"
    peer.close()


def test_output_into_a_pipe_whose_reader_went_away_ends_quietly_with_141(tmp_path):
    """`remote-runner run --dry-run … | head -1`: no 'internal error', no traceback, exit 141,
    with a standby or without."""
    import os
    config = tmp_path / "e.py"
    config.write_text("for i in range(3):\n"
                      "    config.add_component(Component(name='c%d' % i, host='h1',\n"
                      "                         executable='/bin/true', start_index=1))\n")
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "remote_runner.py")
    for standby, unbuffered in (("0", None), ("0", "1"), ("60", None)):
        env = dict(os.environ, REMOTE_RUNNER_STANDBY=standby,
                   REMOTE_RUNNER_STANDBY_DIR=str(tmp_path / "sb"))
        env.pop("PYTHONUNBUFFERED", None)  # buffered, the plan meets the closed pipe at exit
        if unbuffered:
            env["PYTHONUNBUFFERED"] = unbuffered
        os.makedirs(tmp_path / "sb", mode=0o700, exist_ok=True)
        for _ in range(2):  # (the second one may be served by the standby the first started)
            reader, writer = os.pipe()
            os.close(reader)
            done = subprocess.run([sys.executable, script, "-c", str(config), "--dry-run",
                                   "--no-connect"], stdout=writer, stderr=subprocess.PIPE,
                                  env=env, timeout=120)
            os.close(writer)
            assert done.returncode == 141, done.stderr
            assert done.stderr.decode().strip() == "", done.stderr
    # the standby the last command started: stopped once it is there (it writes its pid last)
    import time
    from remote_runner.standby import server
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not server.stop_all(str(tmp_path / "sb")):
        time.sleep(0.1)
