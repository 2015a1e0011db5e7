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
JOBS = 200  # the randomized schedule: 200 jobs arrive, every time

# Between two arrivals, up to a few other events. Each is (kind, a, b), drawn from small ranges so
# that a schedule of 200 arrivals stays well inside Hypothesis's budget of random choices per example:
#   try       a worker (b: one of two per device) tries a waiting job (a: which one)
#   finish    a running job (a) ends
#   foreign   another program holds b GiB of device a
#   allocate  a running job (a) has allocated b/24 of its estimate
event = st.tuples(st.sampled_from(["try", "try", "try", "finish", "finish", "foreign", "allocate"]),
                  st.integers(0, 255), st.integers(0, 24))
arrival = st.tuples(st.integers(1, 40), st.sampled_from([None, None, None, 0, 1, 2]))  # GiB, device it must run on


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.tuples(arrival, st.lists(event, max_size=4)), min_size=JOBS, max_size=JOBS))
def test_a_random_schedule_of_200_jobs_never_overcommits_a_device(app, schedule):
    Training.delete().where(Training.name.startswith("h")).execute()
    foreign = [0] * DEVICES
    allocated: dict[int, int] = {}  # running job id -> bytes it holds now
    running: dict[int, tuple[int, int]] = {}  # job id -> (device, need)
    needs: dict[int, int] = {}
    waiting: list[Training] = []  # queued, in arrival order

    def reservations_agree(device: int) -> None:  # the database's reservations are the running jobs' estimates
        assert reserved_on(f"GPU-{device}", [Training]) == sum(n for d, n in running.values() if d == device)

    for arrived, ((gib, must), events) in enumerate(schedule):
        job = Training.create(source=1, name=f"h{arrived}", status="queued",
                              requested_device=None if must is None else f"cuda:{must}")
        needs[job.id] = gib * GIB
        waiting.append(job)
        for kind, a, b in events:
            if kind == "try" and waiting:
                device = b % (2 * DEVICES) % DEVICES  # two workers a device
                job = waiting[a % len(waiting)]
                held = sum(allocated.get(j, 0) for j, (d, _) in running.items() if d == device)
                reading = max(TOTAL[device] - foreign[device] - held, 0)  # what nvidia-smi would say now
                why = claim_placed(job, gpu_place(f"GPU-{device}", reading, TOTAL[device], device), needs[job.id])
                if why is None:
                    waiting.remove(job)
                    running[job.id] = (device, needs[job.id])
                    allocated[job.id] = 0
                    on_device = sum(need for d, need in running.values() if d == device)
                    assert foreign[device] + on_device <= TOTAL[device], "overcommitted"
                    assert job.requested_device in (None, f"cuda:{device}")
                else:
                    assert why != "taken"
                reservations_agree(device)
            elif kind == "finish" and running:
                job_id = sorted(running)[a % len(running)]
                Training.update(status="completed").where(Training.id == job_id).execute()
                device = running.pop(job_id)[0]
                del allocated[job_id]
                reservations_agree(device)
            elif kind == "foreign":
                foreign[a % DEVICES] = min(b * GIB, TOTAL[a % DEVICES])
            elif kind == "allocate" and running:
                job_id = sorted(running)[a % len(running)]
                allocated[job_id] = max(allocated[job_id], running[job_id][1] * b // 24)
    assert len(needs) == JOBS
    for device in range(DEVICES):
        reservations_agree(device)


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
    small = need // 2
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


# --- at submission: the web (pinned to no GPU) refuses only what no GPU could ever hold ------------

@pytest.fixture
def web_on_fake_gpus(app, tmp_path, monkeypatch):
    """The web process of a box whose GPUs are a fake nvidia-smi (read afresh at each call)."""
    from app import devices

    bin_dir, table = fake_gpus.install(tmp_path / "fake")
    monkeypatch.setenv("PATH", fake_gpus.path_with(bin_dir))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)  # the web server is pinned to no GPU
    monkeypatch.setitem(app.config, "SAE_DEVICE", "auto")
    monkeypatch.setattr(devices, "GPU_CACHE_S", 0.0)
    return table


def tune_form(**changes) -> dict:
    data = {**QUICK_CONFIG, "latent_dim": 1024, **changes}
    return {k: str(v) for k, v in data.items() if v is not None and not isinstance(v, bool)}


def test_the_web_queues_a_job_that_lacks_room_now_and_refuses_only_one_no_gpu_could_hold(client, web_on_fake_gpus):
    from app.models import TuneJob

    table = web_on_fake_gpus
    fake_gpus.write_table(table, [0.001, 80])  # GPU 0, the one an unpinned process sees first, is full
    response = client.post("/api/trainings", json=QUICK_CONFIG)
    assert response.status_code == 201, response.json
    assert client.post("/tunes/", data=tune_form()).status_code == 200

    fake_gpus.write_table(table, [0.001, 0.001])  # no room anywhere now: accepted all the same, and it says so
    response = client.post("/api/trainings", json=QUICK_CONFIG)
    assert response.status_code == 201, response.json
    [note] = [f for f in response.json["findings"] if f["field"] == "batch_size"]
    assert note["level"] == "info" and "will wait in the queue until one has room" in note["message"]
    assert client.post("/tunes/", data=tune_form()).status_code == 200
    assert Training.select().count() == 2 and TuneJob.select().count() == 2

    fake_gpus.write_table(table, [0.001, 0.001], total_gib=0.001)  # every GPU smaller than the job: refused
    response = client.post("/api/trainings", json=QUICK_CONFIG)
    assert response.status_code == 422
    [error] = response.json["errors"]["batch_size"]
    assert "the largest GPU, GPU 0 (NVIDIA H100 80GB HBM3) on " in error and "has 1.0 MiB in all" in error
    assert "no device could ever run it" in error
    tune = client.post("/tunes/", data=tune_form())
    assert tune.status_code == 422 and "no device could ever run it" in tune.get_data(as_text=True)
    with pytest.raises(resources.TooLarge, match="has 1 MiB in all: no device could ever run it"):
        resources.check_submission(client.application.config, 2 * 2**20, "The feature statistics", "Sample fewer.")
    assert Training.select().count() == 2 and TuneJob.select().count() == 2


def test_the_room_at_submission_is_the_free_memory_less_what_running_jobs_reserved(app, web_on_fake_gpus):
    fake_gpus.write_table(web_on_fake_gpus, [0.5, 30], total_gib=40)
    Training.create(source=1, name="holds gpu1", status="running", placed_on=fake_gpus.uuid(1),
                    reserved_bytes=24 * GIB)
    room = resources.submission_room(app.config)
    assert room.total_bytes == 40 * GIB and room.free_bytes == 6 * GIB and room.free_on.startswith("GPU 1 (")


def test_a_cpu_only_box_still_checks_the_ram_free_now(app, client, monkeypatch):
    from app import devices
    from app.devices import DeviceMemory

    monkeypatch.setattr(devices, "_host_memory", lambda: DeviceMemory("cpu", 2**20, 2**30))  # 1 MiB free
    assert resources.submission_room(app.config) is None  # SAE_DEVICE=cpu: no GPU counts
    response = client.post("/api/trainings", json=QUICK_CONFIG)
    assert response.status_code == 422 and "but cpu has 1.0 MiB free" in response.json["errors"]["batch_size"][0]
    with pytest.raises(resources.TooLarge, match="but cpu has 1 MB free"):
        resources.check_submission(app.config, 2 * 2**20, "The feature statistics", "Sample fewer tokens.")


# --- a Hub model's size counts: its extraction waits for room instead of failing for memory --------

HUB_MODEL = "some-org/big-model"


@pytest.fixture
def hub_model(monkeypatch):
    """A Hub model of 30 GiB of weights, as the Hub's metadata would give it (the tests are offline)."""
    from app.extraction import hub

    monkeypatch.setattr(hub, "model_config", lambda name: {"num_hidden_layers": 24, "max_position_embeddings": 2048})
    monkeypatch.setattr(resources, "model_bytes", lambda path: 30 * GIB if path == HUB_MODEL else None)


HUB_FIELDS = {"model_name": HUB_MODEL, "layer": 3, "site": "resid", "text_kind": "stdlib", "model_dtype": "bfloat16"}


def test_an_extraction_of_a_model_no_gpu_could_hold_is_refused_at_its_field(client, web_on_fake_gpus, hub_model):
    from app.models import Extraction

    fake_gpus.write_table(web_on_fake_gpus, [8, 16], total_gib=16)  # 19.5 GiB fits no GPU, ever: refused
    response = client.post("/api/extractions", json=HUB_FIELDS)
    assert response.status_code == 422
    assert "The model needs about 20 GiB but the largest GPU, GPU 0 (NVIDIA H100 80GB HBM3) on " in \
        response.json["errors"]["model_name"][0]
    assert "has 16 GiB in all: no device could ever run it" in response.json["errors"]["model_name"][0]
    assert not Extraction.select().exists()


def test_an_extraction_of_a_hub_model_waits_for_room_instead_of_failing(client, env, web_on_fake_gpus, hub_model,
                                                                         monkeypatch):
    from app.models import Extraction
    from app.work.extraction import run_extraction

    fake_gpus.write_table(web_on_fake_gpus, [8, 16])  # GPUs of 80 GiB, none with room now: accepted
    response = client.post("/api/extractions", json=HUB_FIELDS)
    assert response.status_code == 201, response.json
    job = Extraction.get_by_id(response.json["id"])
    assert job.model_size_bytes == 30 * GIB  # measured by the form, before anything was downloaded
    need = resources.need_bytes(job)
    assert need == int(1.3 * 30 * GIB * 0.5)  # bfloat16 weights and room for the activations: 19.5 GiB

    # a worker on GPU 0 (8 GiB free) takes the job: it goes back on the queue and waits, not failed
    monkeypatch.setenv("SAE_DEVICE", "auto")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert run_extraction(job.id) == "waiting"
    job = reload(job)
    assert job.status == "queued" and job.reason is None and job.placed_on is None

    # one queued before sizes were recorded: its job measures the model before it claims a device
    older = Extraction.create(model_name=HUB_MODEL, layer=3, site="resid", text={"kind": "stdlib"},
                              token_budget=2048, context_length=32, batch_size=4, dtype="float32",
                              model_dtype="float32", status="queued")
    assert resources.need_bytes(older) == 0
    assert run_extraction(older.id) == "waiting"
    older = reload(older)
    assert older.status == "queued" and older.model_size_bytes == 30 * GIB
    assert resources.need_bytes(older) == int(1.3 * 30 * GIB)
    assert not Extraction.select().where(Extraction.status == "failed").exists()


def test_a_downstream_evaluation_counts_its_extractions_model(app, env, hub_model):
    from app.models import ActivationSet, Extraction
    from app.work.downstream import create_downstream

    extraction = Extraction.create(model_name=HUB_MODEL, layer=3, site="resid", text={"kind": "stdlib"},
                                   token_budget=2048, context_length=32, batch_size=4, dtype="float32",
                                   model_dtype="bfloat16", status="completed", model_size_bytes=30 * GIB)
    source = ActivationSet.create(name="from the Hub", kind="extracted", d_in=64, n_tokens=1000, path="activations/x",
                                  params={"model": HUB_MODEL, "model_dtype": "bfloat16",
                                          "extraction_id": extraction.id})
    run = Training.create(source=source, name="on it", status="completed", latent_dim=256)
    evaluation = create_downstream(app.config, run)
    assert reload(evaluation).model_size_bytes == 30 * GIB
    assert resources.need_bytes(evaluation) == int(1.3 * 30 * GIB * 0.5) + 4 * 2 * 64 * 256


def test_a_sweep_no_gpu_could_hold_is_split_into_parts_each_on_a_device_of_its_own(client, env, web_on_fake_gpus,
                                                                                  monkeypatch):
    """Four members of about 12 MiB each on GPUs of 30 MiB: two parts of two, each its own job, placed on
    a GPU each by two pinned workers; the sweep's page, list, API, cancel, resume and delete cover both."""
    from app.models import Sweep
    from app.work.sweeps import split

    assert split([5, 4, 3, 3, 1], 8) == [[0, 3], [1, 2, 4]]  # largest first, each into the emptiest part
    assert split([5, 5, 5], 8) == [[0], [1], [2]]  # two parts of 8 cannot hold 15 in members of 5: three
    assert split([3, 3, 2, 2, 2], 6) == [[0, 1], [2, 3, 4]]  # balancing needs three; first fit packs two
    assert split([9, 1], 8) is None and split([2, 2], 8) == [[0, 1]]
    monkeypatch.setenv("FEATURES_AFTER_TRAINING", "0")
    need = resources.need_bytes(create_run(client, name="probe"))
    client.post("/api/trainings/1/cancel")
    total = 2.5 * need / GIB / 0.9  # parts are sized to 90% of the total: room for two members, not three
    fake_gpus.write_table(web_on_fake_gpus, [0.95 * total, 0.95 * total], total_gib=total)  # never all free
    base = {**QUICK_CONFIG, **SHORT}
    axes = [{"param": "seed", "values": [0, 1, 2, 3]}]
    # the L0 finder reads its ladder in one job: not split, refused; a member no GPU holds: refused, at its own check
    finder = client.post("/api/sweeps", json={"mode": "find_l0", "base": base})
    assert finder.status_code == 422 and "not split over devices" in str(finder.json["errors"]), finder.json
    wide = client.post("/api/sweeps", json={"base": {**base, "latent_dim": 4096}, "axes": axes})
    assert wide.status_code == 422 and "no device could ever run it" in wide.json["errors"]["members.0"][0]
    named = client.post("/api/sweeps", json={"base": base, "axes": axes, "device": "cuda:0"})
    assert named.status_code == 422 and "names its device is not split" in str(named.json["errors"]), named.json

    response = client.post("/api/sweeps", json={"name": "split", "base": base, "axes": axes})
    assert response.status_code == 201, response.json
    body = response.json
    [note] = [f for f in body["findings"] if f["member"] is None]
    assert "split into 2 parts" in note["message"], note
    assert [(p["part"], len(p["members"])) for p in body["parts"]] == [(1, 2), (2, 2)]
    assert len(body["members"]) == 4 and body["status"] == body["group_status"] == "queued"
    parts = [Sweep.get_by_id(p["id"]) for p in body["parts"]]
    assert parts[1].part_of == parts[0].id and {p.parts for p in parts} == {2}
    listed = client.get("/api/sweeps").json["sweeps"]
    assert [s["id"] for s in listed] == [parts[0].id]  # one sweep, with both parts under it
    assert [s["id"] for s in client.get("/api/sweeps?status=queued").json["sweeps"]] == [parts[0].id]
    assert client.get(f"/sweeps/{parts[1].id}").headers["Location"].endswith(f"/sweeps/{parts[0].id}#part-2")
    listing = " ".join(client.get("/sweeps").get_data(as_text=True).split())
    assert listing.count(">split</a>") == 1 and "in 2 parts, one per device" in listing and "4 queued" in listing

    workers = [pinned_worker(env, f"box.gpu{i}", i) for i in (0, 1)]
    try:
        done = wait_for(lambda: all(reload(p).status == "completed" for p in parts) and [reload(p) for p in parts],
                        timeout=180, message="both parts to complete")
    finally:
        for w in workers:
            stop_worker(w)
    # one part on each GPU: the first part's reservation left no room for the second beside it
    assert {p.placed_on for p in done} == {fake_gpus.uuid(0), fake_gpus.uuid(1)}
    members = list(Training.select().where(Training.sweep.in_([p.id for p in parts])))
    assert len(members) == 4 and all(m.status == "completed" for m in members)
    assert not Training.select().where(Training.status == "failed").exists()
    shown = client.get(f"/api/sweeps/{parts[1].id}").json
    assert shown["group_status"] == "completed" and len(shown["members"]) == 4
    page = " ".join(client.get(f"/sweeps/{parts[0].id}").get_data(as_text=True).split())
    assert 'id="sweep-parts"' in page and "split into 2 parts" in page and page.count('id="part-') == 2

    # the whole sweep resumes as one (nothing to resume here), and deletes as one
    assert client.post(f"/api/sweeps/{parts[0].id}/resume").status_code == 409
    deleted = client.delete(f"/api/sweeps/{parts[1].id}")
    assert deleted.status_code in (200, 204), deleted.get_data(as_text=True)
    assert not Sweep.select().where(Sweep.id.in_([p.id for p in parts])).exists()
    assert not Training.select().where(Training.id.in_([m.id for m in members])).exists()
    # cancelled from any part, the whole sweep stops: every part and every member
    again = client.post("/api/sweeps", json={"name": "again", "base": base, "axes": axes}).json
    assert client.post(f"/api/sweeps/{again['parts'][1]['id']}/cancel").status_code == 202
    assert client.get(f"/api/sweeps/{again['id']}").json["group_status"] == "cancelled"
    assert {m.status for m in Training.select().where(Training.id.in_([m["id"] for m in again["members"]]))} == {
        "cancelled"}
