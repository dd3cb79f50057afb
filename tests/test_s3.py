"""Stores on object storage: `--out s3://...` against a real moto S3 server on loopback, kill + resume, verify."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import free_port, wait_http
from extract_helpers import BIN, cli, env_with, write_gmm_job

pytest.importorskip("s3fs")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (BIN / "moto_server").exists(), reason="moto[server] is not installed")]

SECRET = "pflatents-test-secret-do-not-log"
ARGS = ["--shard-size", "200", "--batch-size", "100", "--solver", "rk4", "--steps", "6", "--no-progress"]


@pytest.fixture(scope="module")
def s3_env():
    """A moto S3 server on a free loopback port, and the environment that points s3fs at it."""
    port = free_port()
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint + "/moto-api/", 60, proc)
        env = {"AWS_ACCESS_KEY_ID": "pflatents-test-key", "AWS_SECRET_ACCESS_KEY": SECRET,
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}
        fs = _fs(env)
        fs.mkdir("bkt")
        yield env
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def _fs(env):
    import s3fs

    return s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": env["AWS_ENDPOINT_URL_S3"]}, skip_instance_cache=True)


def _latents(env, url):
    import zarr

    fs = _fs(env)
    return zarr.open_group(zarr.storage.FsspecStore(fs=_async(fs), path=url.removeprefix("s3://"), read_only=True),
                           mode="r")["latents"][:]


def _async(fs):
    import s3fs

    return s3fs.S3FileSystem(key=fs.key, secret=fs.secret, client_kwargs=fs.client_kwargs, asynchronous=True,
                             skip_instance_cache=True)


def _states(env, url) -> list:
    import json

    fs = _fs(env)
    root = url.removeprefix("s3://")
    try:
        n = json.loads(fs.cat_file(f"{root}/zarr.json"))["attributes"]["pflatents"]["n_shards"]
    except (FileNotFoundError, KeyError):
        return []
    blobs = fs.cat([f"{root}/shards/{i:06d}/zarr.json" for i in range(n)], on_error="omit")
    return [json.loads(blobs[k])["attributes"].get("state") if k in blobs else None
            for k in (f"{root}/shards/{i:06d}/zarr.json" for i in range(n))]


def test_s3_store_kill_resume_verify_and_no_secret(tmp_path, cli_env, s3_env):
    data, model = write_gmm_job(tmp_path, n=1400)
    env = env_with(cli_env, **s3_env)
    url = "s3://bkt/runs/out.zarr"
    args = ["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", url, *ARGS]
    proc = subprocess.Popen([str(BIN / "pflatents"), *args], env=env_with(env, PFLATENTS_PAUSE_IN_WRITE="0.5"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while _states(s3_env, url).count("done") < 2:
            assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:] if proc.poll() else ""
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    states = _states(s3_env, url)
    assert 2 <= states.count("done") < len(states) == 7
    assert _fs(s3_env).exists("bkt/runs/out.zarr/lock/owner.json")      # the killed holder's lease is still there
    # resume right away on the same host: the dead holder's lease is taken over (pid check), not waited out
    res = cli(["resume", url, "--no-progress"], env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    ref = cli(["extract", "--data", str(data), "--model", f"gmm:{model}", "--out", str(tmp_path / "ref.zarr"), *ARGS],
              env=env)
    assert ref.returncode == 0, ref.stderr[-3000:]
    import zarr

    np.testing.assert_array_equal(_latents(s3_env, url), zarr.open_group(str(tmp_path / "ref.zarr"))["latents"][:])
    st = cli(["status", url, "--json"], env=env)
    ver = cli(["verify", url], env=env)
    assert ver.returncode == 0 and "7 ok, 0 corrupt" in ver.stdout, ver.stdout + ver.stderr
    # a corrupted object is found and repaired on S3 too
    fs = _fs(s3_env)
    fs.pipe_file("bkt/runs/out.zarr/latents/c/3/0", b"not zstd")
    bad = cli(["verify", url], env=env)
    assert bad.returncode == 1 and "shard 3" in bad.stdout
    assert cli(["resume", url, "--no-progress"], env=env).returncode == 0
    np.testing.assert_array_equal(_latents(s3_env, url), zarr.open_group(str(tmp_path / "ref.zarr"))["latents"][:])
    # credentials never reach the store, its attrs or the output
    blobs = fs.cat(fs.find("bkt/runs/out.zarr"))
    assert all(SECRET.encode() not in b and b"pflatents-test-key" not in b for b in blobs.values())
    for text in (res.stdout, res.stderr, st.stdout, ver.stdout, bad.stdout, bad.stderr):
        assert SECRET not in text


def test_s3_lease_is_taken_by_conditional_writes(s3_env):
    """Racing coordinators on S3: If-None-Match creates and If-Match takeovers let exactly one win;
    the loser of a takeover notices at renewal, check and release."""
    import json
    import threading

    from pflatents.storage import LeaseLostError, StoreLockedError
    from pflatents.storage.lease import LeaseLock

    fs = _fs(s3_env)
    locks = [LeaseLock(fs, "bkt/lease.zarr", "s3://bkt/lease.zarr", lease_s=60) for _ in range(8)]
    assert locks[0].s3

    def race(contenders):
        won, go = [], threading.Barrier(len(contenders))

        def one(lock):
            go.wait()
            try:
                lock.acquire()
                won.append(lock)
            except StoreLockedError:
                pass

        threads = [threading.Thread(target=one, args=(lk,)) for lk in contenders]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return won

    first = race(locks)
    assert len(first) == 1                                      # an absent lease: one conditional create wins
    holder = first[0]
    record = json.loads(fs.cat_file(holder.remote_path))
    fs.pipe_file(holder.remote_path, json.dumps({**record, "lease_until": 0, "process_space": "x"}).encode())
    holder._etag = fs.info(holder.remote_path)["ETag"]           # as if the holder had written that itself
    second = race([lk for lk in locks if lk is not holder])
    assert len(second) == 1                                     # an expired lease: one conditional takeover wins
    with pytest.raises(LeaseLostError, match="taken over"):
        holder.refresh()                                         # its If-Match renewal fails
    with pytest.raises(LeaseLostError):
        holder.check()
    with pytest.raises(LeaseLostError, match="lost during the run"):
        holder.release()
    second[0].keep_alive()
    second[0].refresh()
    second[0].check()
    second[0].release()
    assert not fs.exists("bkt/lease.zarr/lock/owner.json")


def test_s3_two_first_runs_at_once_create_the_store_once(s3_env, monkeypatch):
    """Lock first, then create (issue 12 defect 3): racing first runs on S3 never both create."""
    import threading

    from pflatents.flows.coordinator import locked
    from pflatents.storage import LatentStore, StoreLockedError, open_or_create
    from store_workers import shard_data

    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    url = "s3://bkt/race.zarr"
    outcomes, go = [], threading.Barrier(4)

    def run():
        go.wait()
        try:
            with locked(lambda: open_or_create(url, config={"c": 1}, n_samples=10, sample_shape=(4,), shard_size=4),
                        url, {"command": "extract"}) as store:
                if store.shard_record(0) is None:
                    store.write_shard(0, *shard_data(store, 0))
                outcomes.append(store.meta["created"])
        except StoreLockedError:
            outcomes.append("refused")

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    created = {o for o in outcomes if o != "refused"}
    assert len(outcomes) == 4 and len(created) == 1, outcomes     # every run that ran saw one creation
    store = LatentStore.open(url, mode="r")
    assert store.pending_shards() == [1, 2] and store.verify_shard(0)
    assert store.status()["lock"] is None
