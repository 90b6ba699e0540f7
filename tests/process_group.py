"""Run a group of worker processes that must all succeed (multi-worker Keras, torch.distributed).

One harness for the tests that start cooperating processes: they start together, the
run fails as soon as one exits non-zero or the deadline passes, and no process outlives
the test (SIGKILL: TensorFlow and gloo catch SIGTERM).
"""

import socket
import subprocess
import sys
import time


class WorkerFailure(AssertionError):
    """A worker process failed or did not finish in time."""


def free_ports(n):
    """``n`` distinct free TCP ports on localhost."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path, chars=2000):
    """The end of a worker's log, without TensorFlow's start-up lines."""
    lines = [line for line in path.read_text(errors="replace").splitlines()
             if "cpu_feature_guard" not in line and "absl::InitializeLog" not in line
             and "To enable the following instructions" not in line]
    return "\n".join(lines)[-chars:]


def run_processes(worker, specs, tmp_path, timeout, what="run"):
    """Run ``{name: (args, env)}``, each ``python worker *args``, at once; return when
    every one has exited 0.

    As soon as one exits non-zero, or ``timeout`` seconds pass, kill them all and raise
    `WorkerFailure` naming ``what``, each one's state and the tail of its output.
    """
    procs, logs, reason = {}, {}, None
    try:
        for name, (args, env) in specs.items():
            logs[name] = tmp_path / (name.replace(" ", "_") + ".log")
            with open(logs[name], "w") as log:
                procs[name] = subprocess.Popen([sys.executable, str(worker), *args], env=env,
                                               stdout=log, stderr=subprocess.STDOUT,
                                               stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while reason is None:
            codes = {name: p.poll() for name, p in procs.items()}
            failed = [name for name, code in codes.items() if code not in (None, 0)]
            if failed:
                reason = "failed: " + ", ".join(f"{n} exited with status {codes[n]}"
                                                for n in failed)
            elif all(code == 0 for code in codes.values()):
                return
            elif time.monotonic() > deadline:
                reason = (f"timed out after {timeout} s: "
                          + ", ".join(n for n, c in codes.items() if c is None)
                          + " still running")
            else:
                time.sleep(0.1)
    finally:  # on failure, timeout or an interrupted test: no process outlives the test
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for p in procs.values():
            p.wait()
    states = "\n".join(
        f"--- {name} (status {p.returncode}{', killed' if p.returncode == -9 else ''}):\n"
        f"{_tail(logs[name])}" for name, p in procs.items())
    raise WorkerFailure(f"{what} {reason}\n{states}")
