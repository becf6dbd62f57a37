"""The orphan guard without a server: a parent with a child that ignores its parent's death,
and a shared-memory segment only the dead processes had mapped."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from multiprocessing import shared_memory

import psutil

from preprocess.engine import orphan_guard

PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from multiprocessing import shared_memory
    segment = shared_memory.SharedMemory(create=True, size=4096)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print(segment.name, child.pid, flush=True)
    time.sleep(300)
""")


def test_a_killed_parent_takes_its_children_and_their_shared_memory_along():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    segment, child_pid = parent.stdout.readline().split()
    guard = orphan_guard.start_guard(parent.pid, sys.executable)
    try:
        time.sleep(2 * orphan_guard.POLL_S + 0.5)  # the guard has recorded the child and the segment
        parent.kill()
        parent.wait(10)
        guard.wait(60)  # a bound: the guard exits as soon as its work is done
        assert not psutil.pid_exists(int(child_pid)) or psutil.Process(int(child_pid)).status() == "zombie"
        assert not os.path.exists(f"/dev/shm/{segment.lstrip('/')}")
    finally:
        for pid in (int(child_pid),):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        guard.kill()


SERVER = textwrap.dedent("""
    import subprocess, sys, time
    stub = subprocess.Popen([sys.executable, "-c", sys.argv[1]], stdout=subprocess.PIPE, text=True)
    print(stub.pid, stub.stdout.readline().strip(), flush=True)
    time.sleep(300)
""")
STUCK_STUB = textwrap.dedent("""
    import subprocess, sys, time
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print(engine.pid, flush=True)
    time.sleep(300)  # never notices its server's death, as a stub stuck in its teardown
""")


def test_a_stub_that_outlives_its_server_is_ended_with_its_engine():
    server = subprocess.Popen([sys.executable, "-c", SERVER, STUCK_STUB], stdout=subprocess.PIPE, text=True)
    stub_pid, engine_pid = (int(pid) for pid in server.stdout.readline().split())
    guard = orphan_guard.start_guard(stub_pid, sys.executable)
    try:
        time.sleep(2 * orphan_guard.POLL_S + 0.5)  # the guard has recorded the engine
        server.kill()
        server.wait(10)
        guard.wait(60)  # a bound: the guard exits as soon as its work is done
        for pid in (stub_pid, engine_pid):
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
    finally:
        for pid in (stub_pid, engine_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        guard.kill()


def test_a_reused_pid_is_never_signalled():
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = orphan_guard.start_ticks(bystander.pid)
        assert started == orphan_guard.start_ticks(bystander.pid) and started > 0
        assert orphan_guard.end({bystander.pid: started - 100}, grace_s=0.1) == []  # another start time
        assert bystander.poll() is None
        assert orphan_guard.end({bystander.pid: started}, grace_s=10) == [bystander.pid]
        assert not psutil.pid_exists(bystander.pid) or psutil.Process(bystander.pid).status() == "zombie"
    finally:
        bystander.kill()


def test_a_segment_still_mapped_elsewhere_stays():
    segment = shared_memory.SharedMemory(create=True, size=4096)  # this process maps it
    try:
        assert orphan_guard.remove_unused({segment.name.lstrip("/")}) == []
        assert os.path.exists(f"/dev/shm/{segment.name.lstrip('/')}")
    finally:
        segment.close()
        segment.unlink()
