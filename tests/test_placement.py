"""Placement by memory: a worker takes a job only when its estimate fits the device's free memory
less what the jobs running there reserved; a job that fits nowhere waits, with a reason on its
page and in the API. The GPUs are a fake nvidia-smi; the jobs train on the CPU."""
from __future__ import annotations

import os
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fake_gpus
from app.models import Training
from app.work import resources
from app.work.resources import Place, admit, claim_placed, reserved_on
from conftest import QUICK_CONFIG, create_run, reload, start_worker, stop_worker, wait_for

GIB = 2**30


def gpu_place(key: str, free: int, total: int = 80 * GIB, index: int = 0) -> Place:
    return Place(key, f"GPU {index} (fake) on box", frozenset({key, f"cuda:{index}", f"box:cuda:{index}"}), free, total)


def test_admit_says_why_a_job_does_not_fit():
    gpu = gpu_place("GPU-a", 20 * GIB)
    assert admit(18 * GIB, gpu, 0) is None
    assert admit(18 * GIB, gpu, 3 * GIB) == "it needs 18 GiB and GPU 0 (fake) on box has 17 GiB free"
    assert admit(1, gpu, 0, "cuda:1") == "it must run on cuda:1"
    assert admit(1, gpu, 0, "cuda:0") is None and admit(1, gpu, 0, "GPU-a") is None
    cpu = Place("box:cpu", "the CPU of box", frozenset({"cpu", "box:cpu"}), None)
    assert admit(10**15, cpu, 10**15) is None  # the CPU: everything fits
    for good in ("cpu", "cuda:3", "box-7.lab:cuda:12", "gpu-host:cpu", fake_gpus.uuid(2)):
        assert resources.device_name_problem(good) is None
    for bad in ("", "cuda", "cuda:x", "tpu:0", "../etc", 3, None, "cuda:1; rm", "GPU-", "a" * 80 + ":cpu"):
        assert "Must be a device" in resources.device_name_problem(bad)


def queued(n: int, **fields) -> list[Training]:
    return [Training.create(source=1, name=f"p{i}", status="queued", **fields) for i in range(n)]


# --- the reservation never overcommits a device, whatever the schedule ------------------------------

DEVICES = 3
TOTAL = [80 * GIB, 40 * GIB, 24 * GIB]

op = st.one_of(
    st.tuples(st.just("arrive"), st.integers(1, 40), st.sampled_from([None, None, None, 0, 1, 2])),
    st.tuples(st.just("try"), st.integers(0, 2 * DEVICES - 1), st.integers(0, 10**6)),  # two workers a device
    st.tuples(st.just("finish"), st.integers(0, 10**6), st.just(None)),
    st.tuples(st.just("foreign"), st.integers(0, DEVICES - 1), st.integers(0, 24)),  # other programs' use (GiB)
    st.tuples(st.just("allocate"), st.integers(0, 10**6), st.floats(0, 1)),  # a running job allocates part
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(st.lists(op, min_size=1, max_size=400))
def test_a_random_schedule_of_up_to_200_jobs_never_overcommits_a_device(app, schedule):
    Training.delete().where(Training.name.startswith("h")).execute()
    foreign = [0] * DEVICES
    allocated: dict[int, int] = {}  # running job id -> bytes it holds now
    running: dict[int, tuple[int, int]] = {}  # job id -> (device, need)
    needs: dict[int, int] = {}
    arrived = 0
    for kind, a, b in schedule:
        if kind == "arrive" and arrived < 200:
            requested = None if b is None else f"cuda:{b}"
            job = Training.create(source=1, name=f"h{arrived}", status="queued", requested_device=requested)
            needs[job.id] = a * GIB
            arrived += 1
        elif kind == "try":
            device = a % DEVICES
            waiting = list(Training.select().where((Training.status == "queued") & Training.name.startswith("h"))
                           .order_by(Training.id))
            if not waiting:
                continue
            job = waiting[b % len(waiting)]
            held = sum(allocated.get(j, 0) for j, (d, _) in running.items() if d == device)
            reading = max(TOTAL[device] - foreign[device] - held, 0)  # what nvidia-smi would say now
            why = claim_placed(job, gpu_place(f"GPU-{device}", reading, TOTAL[device], device), needs[job.id])
            if why is None:
                running[job.id] = (device, needs[job.id])
                allocated[job.id] = 0
                on_device = sum(need for d, need in running.values() if d == device)
                assert foreign[device] + on_device <= TOTAL[device], "overcommitted"
                assert job.requested_device in (None, f"cuda:{device}")
            else:
                assert why != "taken"
        elif kind == "finish" and running:
            job_id = sorted(running)[a % len(running)]
            Training.update(status="completed").where(Training.id == job_id).execute()
            del running[job_id], allocated[job_id]
        elif kind == "foreign":
            foreign[a] = min(b * GIB, TOTAL[a])
        elif kind == "allocate" and running:
            job_id = sorted(running)[a % len(running)]
            allocated[job_id] = max(allocated[job_id], int(b * running[job_id][1]))
        for device in range(DEVICES):  # the database's reservations are the running jobs' estimates
            assert reserved_on(f"GPU-{device}", [Training]) == sum(n for d, n in running.values() if d == device)


def test_workers_racing_for_one_gpu_never_overcommit_it(app):
    """Eight threads (own connections) claim eight 3 GiB jobs on one GPU with 10 GiB free: three fit."""
    from app.db import database

    jobs = queued(8)
    place = gpu_place("GPU-race", 10 * GIB)
    barrier, results = threading.Barrier(len(jobs)), []

    def claim(job):
        barrier.wait()
        try:
            results.append(claim_placed(job, place, 3 * GIB))
        finally:
            database.close()

    threads = [threading.Thread(target=claim, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(None) == 3 and reserved_on("GPU-race") == 9 * GIB
    assert all(why and "has 1.0 GiB free" in why for why in results if why is not None)


# --- real workers on fake GPUs ------------------------------------------------------------------

@pytest.fixture
def fake_smi(tmp_path, env, monkeypatch):
    bin_dir, table = fake_gpus.install(tmp_path / "fake")
    monkeypatch.setenv("PATH", fake_gpus.path_with(bin_dir))
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")
    return table


SHORT = {"total_steps": 40, "log_every": 10}  # the jobs here are about where they run, not what they learn


def pinned_worker(env, name: str, gpu: int):
    return start_worker({**env, "SAE_DEVICE": "auto", "CUDA_VISIBLE_DEVICES": str(gpu), "PATH": os.environ["PATH"],
                         "PLACEMENT_RETRY_S": "0.3"}, name=name)


def test_jobs_go_where_they_fit_and_wait_where_they_do_not(client, env, fake_smi):
    need = resources.need_bytes(create_run(client, name="probe"))  # QUICK_CONFIG's estimate, about 12 MiB
    client.post("/api/trainings/1/cancel")
    small, big = need // 2, 100 * GIB
    fake_gpus.write_table(fake_smi, [small / GIB, 80, small / GIB, small / GIB])  # only GPU 1 has room
    workers = [pinned_worker(env, f"box.gpu{i}", i) for i in (0, 1)]
    try:
        wait_for(lambda: client.get("/api/workers").json.get("workers") and
                 {w["name"] for w in client.get("/api/workers").json["workers"]} >= {"box.gpu0", "box.gpu1"},
                 timeout=120, message="both workers' beats")
        first = create_run(client, name="fits on gpu1", **SHORT)
        first = wait_for(lambda: (r := reload(first)).status == "completed" and r, timeout=120,
                         message="the first run to complete")
        assert first.worker_name == "box.gpu1" and first.placed_on == fake_gpus.uuid(1)
        assert first.reserved_bytes == need and first.attempts_log[0]["device"].startswith("GPU 1 (")

        # now nothing has room: the next run waits, with the reason on its page and in the API
        fake_gpus.write_table(fake_smi, [small / GIB, small / GIB, small / GIB, small / GIB])
        waiting = create_run(client, name="waits", **SHORT)
        # the other worker's last beat may still show its room from before the change: the reason is
        # refreshed at each check, so it comes to say what the devices have now
        expected = f"Waiting for {resources.fmt_gib(need)} on a GPU; the largest free is {resources.fmt_gib(small)}"
        reasons = []

        def reason_now():
            reasons.append(client.get(f"/api/trainings/{waiting.id}").json["wait_reason"])
            return reasons[-1] if reasons[-1] and reasons[-1].startswith(expected) else None

        try:
            wait_for(reason_now, timeout=60, message=f"the wait reason to say {expected!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it said {reasons[-1]!r}") from None
        assert reload(waiting).status == "queued"
        page = client.get(f"/trainings/{waiting.id}").get_data(as_text=True)
        assert "Waiting for" in page and "the largest free is" in page
        # a run that must run on a device no worker has waits with that reason
        elsewhere = create_run(client, name="on gpu3", device="cuda:3", **SHORT)
        assert wait_for(lambda: client.get(f"/api/trainings/{elsewhere.id}").json["wait_reason"], timeout=60,
                        message="the reason") == ("Waiting for cuda:3: no worker runs on that device. It starts "
                                                  "when a worker on it joins the queue.")
        # room on GPU 0: the waiting run starts there and completes; the other still waits
        fake_gpus.write_table(fake_smi, [80, small / GIB, small / GIB, small / GIB])
        done = wait_for(lambda: (r := reload(waiting)).status == "completed" and r, timeout=120,
                        message="the waiting run to run")
        assert done.worker_name == "box.gpu0" and done.wait_reason is None and not done.reason
        api = client.get(f"/api/trainings/{done.id}").json
        assert api["wait_reason"] is None and api["placed_on"] == fake_gpus.uuid(0)
        assert [a["worker"] for a in api["attempts"]] == ["box.gpu0"]
        assert reload(elsewhere).status == "queued"
        # and a run that names GPU 0 goes there
        named = create_run(client, name="on gpu0", device="cuda:0", **SHORT)
        named = wait_for(lambda: (r := reload(named)).status == "completed" and r, timeout=120, message="named run")
        assert named.worker_name == "box.gpu0"
        # no run failed for memory, anywhere
        assert not Training.select().where(Training.status == "failed").exists()
    finally:
        for w in workers:
            stop_worker(w)


def test_a_job_that_fits_is_found_behind_one_that_does_not_without_a_pause(client, env):
    """A worker sweeps the whole queue before it pauses: a run queued behind one that must run
    elsewhere starts at once, even when the pause between sweeps is ten minutes."""
    elsewhere = create_run(client, name="on gpu3", device="cuda:3", **SHORT)
    runnable = create_run(client, name="anywhere", **SHORT)
    worker = start_worker({**env, "SAE_DEVICE": "cpu", "FEATURES_AFTER_TRAINING": "0", "PLACEMENT_RETRY_S": "600"},
                          name="box.cpu")
    try:
        done = wait_for(lambda: (r := reload(runnable)).status == "completed" and r, timeout=120,
                        message="the run behind the waiting one")
        assert done.worker_name == "box.cpu"
        assert wait_for(lambda: reload(elsewhere).wait_reason, timeout=60, message="the wait reason").startswith(
            "Waiting for cuda:3")
        assert reload(elsewhere).status == "queued"
    finally:
        stop_worker(worker)


def test_a_device_that_cannot_be_named_is_refused_at_its_field(client, env):
    for bad in ("tpu:0", 7, "", "cuda:1 && x"):
        response = client.post("/api/trainings", json={**QUICK_CONFIG, "device": bad})
        assert response.status_code == 422 and "Must be a device" in response.json["errors"]["device"][0]
    assert not Training.select().exists()
    response = client.post("/api/trainings", json={**QUICK_CONFIG, "device": "cuda:2"})
    assert response.status_code == 201
    assert client.get(f"/api/trainings/{response.json['id']}").json["requested_device"] == "cuda:2"
