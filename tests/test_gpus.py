"""`make run` on a box with GPUs: one pinned worker per GPU, found with a fake nvidia-smi (no torch in
the supervisor); GPUS and WORKERS_PER_GPU choose; a CPU-only box gets one worker."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket

import pytest

import fake_gpus
from conftest import ROOT, wait_for
from test_supervisor import answers, descendants, kill_tree, processes, start_run_sh

HOST = socket.gethostname().split(".")[0]


def load_supervisor():
    spec = importlib.util.spec_from_file_location("supervise_under_test", ROOT / "scripts" / "supervise.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_smi(tmp_path, monkeypatch):
    from app import devices

    bin_dir, table = fake_gpus.install(tmp_path / "fake")
    fake_gpus.write_table(table, [70, 60, 50, 40])
    monkeypatch.setenv("PATH", fake_gpus.path_with(bin_dir))
    # list_gpus keeps its answer for GPU_CACHE_S: a read by the test before (another PATH, another table)
    # must not be this test's first answer
    monkeypatch.setattr(devices, "_gpus_cache", (-1e9, None))
    return {"bin": bin_dir, "table": table}


def plan(**environ):
    supervise = load_supervisor()
    return supervise.plan_workers({"SAE_DEVICE": "auto", **environ}, "box")


def test_the_devices_module_reads_the_gpus_and_the_pinned_one(fake_smi):
    from app import devices

    gpus = devices.list_gpus(fresh=True)
    assert [g.index for g in gpus] == [0, 1, 2, 3] and gpus[2].uuid == fake_gpus.uuid(2)
    assert gpus[1].free_bytes == 60 * 2**30 and gpus[1].total_bytes == 80 * 2**30
    assert gpus[0].name == "NVIDIA H100 80GB HBM3"
    assert devices.worker_gpu("auto", {"CUDA_VISIBLE_DEVICES": "2"}).index == 2
    assert devices.worker_gpu("cuda:1", {"CUDA_VISIBLE_DEVICES": "3,1"}).index == 1
    assert devices.worker_gpu("auto", {"CUDA_VISIBLE_DEVICES": fake_gpus.uuid(3)}).index == 3
    assert devices.worker_gpu("auto", {}).index == 0
    assert devices.worker_gpu("cpu", {"CUDA_VISIBLE_DEVICES": "2"}) is None
    assert devices.worker_gpu("auto", {"CUDA_VISIBLE_DEVICES": ""}) is None  # CUDA hidden: the CPU
    fake_smi["table"].unlink()  # the driver is gone: nvidia-smi fails
    assert devices.list_gpus(fresh=True) is None


def test_the_plan_one_worker_per_gpu_chosen_gpus_several_per_gpu_and_cpu_only(fake_smi):
    assert plan() == [(f"box.gpu{i}", {"CUDA_VISIBLE_DEVICES": str(i), "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
                      for i in range(4)]
    assert [(n, e["CUDA_VISIBLE_DEVICES"]) for n, e in plan(GPUS="0,2", WORKERS_PER_GPU="2")] == [
        ("box.gpu0.0", "0"), ("box.gpu0.1", "0"), ("box.gpu2.0", "2"), ("box.gpu2.1", "2")]
    assert [n for n, _ in plan(GPUS=fake_gpus.uuid(3))] == ["box.gpu3"]
    assert plan(SAE_DEVICE="cpu") == [("box.cpu", {})]
    supervise = load_supervisor()
    for bad, words in ((dict(GPUS="7"), "'7' is not a GPU of this machine"),
                       (dict(WORKERS_PER_GPU="two"), "not a whole number"),
                       (dict(WORKERS_PER_GPU="0"), "between 1 and 64")):
        with pytest.raises(supervise.PlanError, match=words):
            supervise.plan_workers({"SAE_DEVICE": "auto", **bad}, "box")
    fake_smi["table"].unlink()
    assert plan() == [("box.cpu", {})]  # nvidia-smi fails: a CPU-only box


def test_plan_without_nvidia_smi_is_one_cpu_worker(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi there on this machine
    assert plan() == [("box.cpu", {})]


def environ_of(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        pairs = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def workers_of(supervisor: int) -> dict[str, int]:
    """The supervisor's worker children by their --name."""
    found = {}
    for pid, (ppid, cmd) in processes().items():
        if ppid == supervisor and "worker.py" in cmd and "--name" in cmd:
            found[cmd.split("--name", 1)[1].split()[0]] = pid
    return found


def test_make_run_starts_a_pinned_worker_per_gpu_and_restarts_each(tmp_path, empty_database_url, fake_smi, redis_url,
                                                                    redis_client):
    """With REDIS_URL set (a queue several boxes share) it starts no Redis of its own."""
    data = tmp_path / "data"
    proc, port, _ = start_run_sh(tmp_path, data, empty_database_url, SAE_DEVICE="auto", REDIS_URL=redis_url,
                                 QUEUE_NAME=f"gpus-{os.getpid()}")
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/health") == 200 or proc.poll() is not None, timeout=180,
                 message="the web server")
        assert proc.poll() is None, (tmp_path / "run.out").read_text()
        names = [f"{HOST}.gpu{i}" for i in range(4)]
        workers = wait_for(lambda: (w := workers_of(proc.pid)) and sorted(w) == names and w, timeout=60,
                           message="four workers")
        assert "no Redis is started here" in (tmp_path / "run.out").read_text()
        assert not [cmd for ppid, cmd in processes().values() if ppid == proc.pid and "redis-server" in cmd]
        for name, pid in workers.items():
            pinned = environ_of(pid)
            assert pinned["CUDA_VISIBLE_DEVICES"] == name[-1] and pinned["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        wait_for(lambda: f"workers: {', '.join(names)}" in (tmp_path / "run.out").read_text(), timeout=60,
                 message="the ready text naming the workers")
        # one dies: it alone is started again, under the same name and pinning
        os.kill(workers[names[2]], signal.SIGKILL)
        again = wait_for(lambda: (w := workers_of(proc.pid)).get(names[2]) not in (None, workers[names[2]]) and w,
                         timeout=60, message="the dead worker to be started again")
        assert environ_of(again[names[2]])["CUDA_VISIBLE_DEVICES"] == "2"
        assert all(again[n] == workers[n] for n in names if n != names[2])
        log = (data / "logs" / "supervisor.log").read_text()
        assert f"worker {names[2]} on GPU 2 (pid {workers[names[2]]}) was killed by signal 9" in log
        assert (data / "logs" / f"worker-{names[0]}.log").exists()
        # the restarted worker takes up its name again (RQ's registration of the dead one is released)
        started = f"Worker {names[2]}: started with PID {again[names[2]]}"
        wait_for(lambda: started in (data / "logs" / f"worker-{names[2]}.log").read_text(), timeout=60,
                 message="the restarted worker to take up its name")
        assert workers_of(proc.pid)[names[2]] == again[names[2]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        assert not [p for p in descendants(proc.pid)]
    finally:
        kill_tree(proc)


def test_only_a_cpu_worker_imports_what_its_work_horses_need_before_forking_them(fake_smi, monkeypatch, redis_url):
    """A GPU worker's parent never imports torch (CUDA must be set up first in the horse that uses it);
    a CPU worker's imports it once for all its horses (tests/test_jobs.py sees that happen)."""
    from app.config import load_settings
    from app.work.worker import make_worker

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    settings = {**load_settings(), "REDIS_URL": redis_url, "QUEUE_NAME": "preload"}
    assert make_worker({**settings, "SAE_DEVICE": "auto"}).preload is False
    assert make_worker({**settings, "SAE_DEVICE": "cuda:0"}).preload is False
    assert make_worker({**settings, "SAE_DEVICE": "cpu"}).preload is True
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "7")  # no such GPU: it trains on the CPU
    assert make_worker({**settings, "SAE_DEVICE": "auto"}).preload is True
