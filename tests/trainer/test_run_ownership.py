"""Checkpoints that belong to one run: the claim on ``storage.checkpoints``, manifests that record
their run, resume sources checked against the run's uid and the digest the operator expects,
an explicit start from another run's checkpoint, and pruning that stays inside its prefix.

Against a local folder and a real S3 server (versitygw on loopback); the trainer runs use the
tiny in-code MusicGen on the CPU.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fermata_api import (
    EXIT_CONFIG_ERROR,
    CheckpointRef,
    PodEnv,
    RunRef,
    TrainerState,
    TrainerStatus,
)
from fermata_api.contract import ENV_RESUME_DIGEST, ENV_RESUME_EXPLICIT, ENV_RESUME_FROM
from fermata_api.spec import TrainingRunSpec
from fermata_trainer.checkpoints import OWNER_KEY, CheckpointStore, claim_prefix
from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.storage import LocalStorage, S3Storage, Storage, make_s3_client, sha256_bytes
from fermata_trainer.training_loop import Trainer
from tests.s3_fixture import S3Server
from tests.trainer.conftest import ConfigFactory
from tests.trainer.helpers import log_events, run_trainer, write_config

pytestmark = pytest.mark.trainer

RUN_X = RunRef(name="run-x", namespace="team-a", uid="uid-x")
RUN_Y = RunRef(name="run-y", namespace="team-b", uid="uid-y")


def _s3(server: S3Server, bucket: str, prefix: str) -> S3Storage:
    client = make_s3_client(
        endpoint_url=server.endpoint_url,
        region=server.region,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    return S3Storage(bucket, prefix, client=client)


StorageFactory = Callable[[str], Storage]


@pytest.fixture(params=["local", "s3"])
def make_storage(request: pytest.FixtureRequest, tmp_path: Path) -> StorageFactory:
    """Storages under one root (a folder, or a fresh bucket): ``make_storage("runs/a")``."""
    if request.param == "local":
        return lambda prefix: LocalStorage(tmp_path / "root" / prefix)
    server: S3Server = request.getfixturevalue("s3_server")
    bucket = server.make_bucket("ownership")
    return lambda prefix: _s3(server, bucket, prefix)


def _files(tmp_path: Path, step: int) -> dict[str, Path]:
    folder = tmp_path / f"staging-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, size in (("lm.pt", 2000), ("state.pt", 300)):
        path = folder / name
        path.write_bytes(bytes((step * 17 + i) % 251 for i in range(size)))
        out[name] = path
    return out


def _manifests(storage: Storage) -> dict[str, bytes]:
    return {o.key: storage.get_bytes(o.key) for o in storage.list("checkpoints/")}


# ----------------------------------------------------------------------------- the claim


def test_claim_admits_the_owner_and_refuses_everyone_else(make_storage: StorageFactory) -> None:
    storage = make_storage("runs/shared")
    first = claim_prefix(storage, RUN_X)
    assert first.created and first.uri == storage.uri_of(OWNER_KEY)
    claim = json.loads(storage.get_bytes(OWNER_KEY))
    assert {k: claim[k] for k in ("uid", "namespace", "name")} == {
        "uid": "uid-x",
        "namespace": "team-a",
        "name": "run-x",
    }
    assert claim["claimedAt"]

    # the same run again (a resume, a new incarnation): fine, the claim stays as it was
    again = claim_prefix(storage, RUN_X.model_copy())
    assert (
        not again.created
        and storage.get_bytes(OWNER_KEY) == json.dumps(claim, indent=2, sort_keys=True).encode()
    )

    # another run, even one with the same name in the same namespace (re-created): refused
    prefix = storage.uri.rstrip("/") + "/"
    expected = (
        f"storage.checkpoints {prefix} belongs to TrainingRun team-a/run-x (uid uid-x); "
        "give this run its own prefix"
    )
    for other in (RUN_Y, RunRef(name="run-x", namespace="team-a", uid="uid-x2")):
        with pytest.raises(TrainerConfigError) as refused:
            claim_prefix(storage, other)
        assert str(refused.value) == expected
    # a standalone trainer (no uid) does not get a prefix a TrainingRun holds
    with pytest.raises(TrainerConfigError, match="belongs to TrainingRun team-a/run-x"):
        claim_prefix(storage, RunRef(name="run-x", namespace="team-a"))
    assert json.loads(storage.get_bytes(OWNER_KEY)) == claim


def test_claim_of_a_run_without_uid(make_storage: StorageFactory) -> None:
    storage = make_storage("standalone")
    assert claim_prefix(storage, RunRef()).created
    assert json.loads(storage.get_bytes(OWNER_KEY))["uid"] is None
    assert not claim_prefix(storage, RunRef()).created  # the same standalone run again
    with pytest.raises(TrainerConfigError, match="belongs to a trainer run outside Kubernetes"):
        claim_prefix(storage, RUN_X)
    named = make_storage("named")
    claim_prefix(named, RunRef(name="local", namespace="dev"))
    with pytest.raises(TrainerConfigError, match=r"TrainingRun dev/local \(no uid"):
        claim_prefix(named, RunRef(name="other", namespace="dev"))


def _race_for_claim(storages: list[Storage]) -> tuple[list[str], list[str]]:
    """Every storage claims its prefix for a different run at the same moment: (won, refused)."""
    start = threading.Barrier(len(storages))
    won: list[str] = []
    refused: list[str] = []

    def contend(i: int) -> None:
        start.wait()
        try:
            claim_prefix(storages[i], RunRef(name=f"run-{i}", namespace="race", uid=f"uid-{i}"))
            won.append(f"uid-{i}")
        except TrainerConfigError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=contend, args=(i,)) for i in range(len(storages))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, refused


def test_claims_racing_for_one_prefix_have_exactly_one_winner(make_storage: StorageFactory) -> None:
    contenders = 6
    for round_ in range(4):
        # one storage object per contender (own S3 client), all at the same prefix
        storages = [make_storage(f"race-{round_}") for _ in range(contenders)]
        won, refused = _race_for_claim(storages)
        assert len(won) == 1, (won, refused)
        assert len(refused) == contenders - 1
        winner = json.loads(storages[0].get_bytes(OWNER_KEY))["uid"]
        assert won == [winner]
        assert all(f"(uid {winner})" in message for message in refused)

    # the primitive itself: of racing creates exactly one reports True, and its bytes stay
    storages = [make_storage("primitive") for _ in range(contenders)]
    start = threading.Barrier(contenders)
    results: dict[int, bool] = {}

    def create(i: int) -> None:
        start.wait()
        results[i] = storages[i].put_bytes_if_absent("k/obj.json", f"writer {i}".encode() * 500)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, created in results.items() if created]
    assert len(results) == contenders and len(winners) == 1
    assert storages[0].get_bytes("k/obj.json") == f"writer {winners[0]}".encode() * 500
    assert not storages[0].put_bytes_if_absent("k/obj.json", b"late")


def test_s3_conditional_create_is_honoured_by_the_server(s3_server: S3Server) -> None:
    """versitygw answers ``If-None-Match: *`` on an existing key with 412 PreconditionFailed."""
    from botocore.exceptions import ClientError

    bucket = s3_server.make_bucket("conditional")
    client = s3_server.client()
    client.put_object(Bucket=bucket, Key="owner.json", Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=bucket, Key="owner.json", Body=b"second", IfNoneMatch="*")
    assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert refused.value.response["Error"]["Code"] == "PreconditionFailed"
    assert client.get_object(Bucket=bucket, Key="owner.json")["Body"].read() == b"first"


# ----------------------------------------------------------------------------- pruning


def test_pruning_stays_inside_its_prefix(make_storage: StorageFactory, tmp_path: Path) -> None:
    mine, sibling = make_storage("runs/run"), make_storage("runs/run-2")
    nested = make_storage("runs/run/cache/run")  # below mine, not a checkpoint of mine
    other = CheckpointStore(sibling, keep_last=5, local_dir=tmp_path / "sib", owner=RUN_Y)
    for step in (1, 2, 3):
        other.write(step, 0, "periodic", _files(tmp_path, step))
    nested.put_bytes("checkpoints/step-000000001/manifest.json", b"{}")
    claim_prefix(mine, RUN_X)
    mine.put_bytes("reports/stop.json", b"{}")
    before_sibling = _manifests(sibling)

    store = CheckpointStore(mine, keep_last=1, local_dir=tmp_path / "mine", owner=RUN_X)
    for step in (1, 2, 3, 4):
        store.write(step, 0, "periodic", _files(tmp_path, step))
        store.prune()
    assert store.steps() == [4]
    assert _manifests(sibling) == before_sibling  # s3://b/runs/run does not match run-2/
    assert nested.exists("checkpoints/step-000000001/manifest.json")
    assert mine.exists(OWNER_KEY) and mine.exists("reports/stop.json")


# ----------------------------------------------------------------------------- resume


def test_discovery_and_pruning_ignore_another_runs_manifests(
    make_storage: StorageFactory, tmp_path: Path
) -> None:
    """A prefix two runs shared before claims existed: each run sees only its own checkpoints."""
    storage = make_storage("legacy-shared")
    x = CheckpointStore(storage, keep_last=1, local_dir=tmp_path / "x", owner=RUN_X)
    y = CheckpointStore(storage, keep_last=1, local_dir=tmp_path / "y", owner=RUN_Y)
    x.write(10, 0, "periodic", _files(tmp_path, 10))
    x.write(20, 0, "periodic", _files(tmp_path, 20))
    y.write(30, 0, "periodic", _files(tmp_path, 30))
    manifest = json.loads(storage.get_bytes("checkpoints/step-000000030/manifest.json"))
    assert manifest["run"] == {"uid": "uid-y", "namespace": "team-b", "name": "run-y"}

    fresh_x = CheckpointStore(storage, keep_last=1, local_dir=tmp_path / "x2", owner=RUN_X)
    latest = fresh_x.latest_verified()
    assert latest is not None and latest.step == 20  # y's newer 30 is not x's
    assert fresh_x.resolve_resume(None) is not None
    assert 30 in fresh_x.known_foreign and 30 not in fresh_x.known_bad
    assert fresh_x.prune() == [10]  # keep 1 of x's own; y's 30 is left alone
    assert storage.exists("checkpoints/step-000000030/manifest.json")

    fresh_y = CheckpointStore(storage, keep_last=1, local_dir=tmp_path / "y2", owner=RUN_Y)
    latest = fresh_y.latest_verified()
    assert latest is not None and latest.step == 30
    assert fresh_y.prune() == []  # x's 20 is not y's to delete
    assert storage.exists("checkpoints/step-000000020/manifest.json")

    # a manifest from before runs were recorded counts as the run's of that name
    legacy = CheckpointStore(storage, keep_last=3, local_dir=tmp_path / "l")
    legacy.write(40, 0, "periodic", _files(tmp_path, 40), extra={"runName": "run-x"})
    latest = CheckpointStore(storage, 3, tmp_path / "x3", owner=RUN_X).latest_verified()
    assert latest is not None and latest.step == 40
    latest = CheckpointStore(storage, 3, tmp_path / "y3", owner=RUN_Y).latest_verified()
    assert latest is not None and latest.step == 30


def test_resume_source_must_be_ours_and_match_the_expected_digest(
    make_storage: StorageFactory, tmp_path: Path
) -> None:
    mine, theirs = make_storage("runs/mine"), make_storage("runs/theirs")
    store = CheckpointStore(mine, keep_last=3, local_dir=tmp_path / "mine", owner=RUN_X)
    own = store.write(5, 0, "periodic", _files(tmp_path, 5))
    foreign_store = CheckpointStore(theirs, keep_last=3, local_dir=tmp_path / "theirs", owner=RUN_Y)
    foreign = foreign_store.write(8, 1, "periodic", _files(tmp_path, 8))

    # (a) the digest the operator recorded
    chosen = store.resolve_resume(own.uri, expected_digest=own.digest)
    assert chosen is not None and chosen.step == 5 and chosen.in_store and chosen.other_run is None
    bad = "sha256:" + "0" * 64
    with pytest.raises(TrainerConfigError) as mismatch:
        store.resolve_resume(own.uri, expected_digest=bad)
    assert own.digest in str(mismatch.value) and bad in str(mismatch.value)
    # the manifest rewritten in place (what a second run on the prefix did): refused
    rewritten = CheckpointStore(mine, keep_last=3, local_dir=tmp_path / "rw", owner=RUN_X)
    rewritten.write(5, 0, "signal", _files(tmp_path, 6))
    with pytest.raises(TrainerConfigError, match="rewritten after this run recorded it"):
        store.resolve_resume(own.uri, expected_digest=own.digest)

    # (b) another run's manifest: refused, unless the user chose it
    with pytest.raises(TrainerConfigError) as not_ours:
        store.resolve_resume(foreign.uri, expected_digest=foreign.digest)
    assert "written by TrainingRun team-b/run-y (uid uid-y)" in str(not_ours.value)
    assert "spec.resumeFrom" in str(not_ours.value)

    fresh_mine = make_storage("runs/fresh")
    fresh = CheckpointStore(fresh_mine, keep_last=3, local_dir=tmp_path / "fresh", owner=RUN_X)
    started = fresh.resolve_resume(foreign.uri, explicit=True)
    assert started is not None and started.step == 8 and not started.in_store
    assert started.ref.uri == foreign.uri and started.ref.digest == foreign.digest
    assert started.other_run is not None and started.other_run["uid"] == "uid-y"
    assert started.files["lm.pt"].read_bytes() == _files(tmp_path, 8)["lm.pt"].read_bytes()
    # ...and the run's own checkpoint takes precedence once it has one
    fresh.write(9, 1, "periodic", _files(tmp_path, 9))
    again = fresh.resolve_resume(foreign.uri, explicit=True)
    assert again is not None and again.step == 9 and again.in_store and again.other_run is None
    # an explicit source that does not verify is an error, not a silent fresh start
    theirs.delete("checkpoints/step-000000008/state.pt")
    empty = CheckpointStore(make_storage("runs/empty"), 3, tmp_path / "empty", owner=RUN_X)
    with pytest.raises(TrainerConfigError, match="does not verify"):
        empty.resolve_resume(foreign.uri, explicit=True)
    with pytest.raises(TrainerConfigError, match="not a checkpoint manifest URI"):
        empty.resolve_resume("s3://elsewhere/model.pt", explicit=True)


def test_pod_env_and_spec_carry_the_resume_fields() -> None:
    env = PodEnv.from_environ(
        {
            ENV_RESUME_FROM: "s3://b/r/checkpoints/step-000000001/manifest.json",
            ENV_RESUME_DIGEST: "sha256:abc",
            ENV_RESUME_EXPLICIT: "1",
        }
    )
    assert env.resume_digest == "sha256:abc" and env.resume_explicit
    assert not PodEnv.from_environ({ENV_RESUME_EXPLICIT: "0"}).resume_explicit
    assert PodEnv.from_environ({}).resume_digest is None
    schema = TrainingRunSpec.model_json_schema(by_alias=True)
    assert "resumeFrom" in schema["properties"]
    rules = [v["rule"] for v in schema.get("x-kubernetes-validations", [])]
    assert any("oldSelf.resumeFrom" in r for r in rules)


# ----------------------------------------------------------------------------- the trainer


class _Recorder:
    """A reporter that keeps every status (and answers like an API server without control)."""

    def __init__(self) -> None:
        self.statuses: list[TrainerStatus] = []

    def report(self, status: TrainerStatus) -> dict[str, Any] | None:
        self.statuses.append(status)
        return {}

    def close(self) -> None:
        pass


def _steps_with_manifest(storage: Storage) -> list[int]:
    return sorted(
        int(o.key.split("/")[1].removeprefix("step-"))
        for o in storage.list("checkpoints/")
        if o.key.endswith("/manifest.json")
    )


def test_cli_refuses_a_prefix_another_run_claimed(
    tmp_path: Path, s3_server: S3Server, make_config: ConfigFactory
) -> None:
    """Two TrainingRuns on one S3 prefix: the second exits 2 naming the owner; the owner itself
    resumes; a checkpoint whose digest is not the one in status is refused."""
    bucket = s3_server.make_bucket("two-runs")
    uri = f"s3://{bucket}/runs/shared"
    env = {**s3_server.env(), "KUBECONFIG": str(tmp_path / "no-kubeconfig")}
    cache = str(tmp_path / "code-cache")

    def config(run: RunRef, name: str, max_steps: int) -> Path:
        cfg = make_config(
            storage=uri,
            work_dir=tmp_path / name,
            max_steps=max_steps,
            checkpoint_every=2,
            keep_last=1,
            cache_uri=cache,
        )
        cfg.run = run
        return write_config(cfg, tmp_path / f"{name}.json")

    first = run_trainer(config(RUN_X, "x-0", 4), env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    storage = _s3(s3_server, bucket, "runs/shared")
    written = _manifests(storage)
    assert _steps_with_manifest(storage) == [4]
    manifest = json.loads(storage.get_bytes("checkpoints/step-000000004/manifest.json"))
    assert manifest["run"] == {"uid": "uid-x", "namespace": "team-a", "name": "run-x"}
    digest = f"sha256:{sha256_bytes(storage.get_bytes('checkpoints/step-000000004/manifest.json'))}"
    last = f"{uri}/checkpoints/step-000000004/manifest.json"

    intruder = run_trainer(config(RUN_Y, "y-0", 4), env)
    assert intruder.returncode == EXIT_CONFIG_ERROR, intruder.stdout[-3000:] + intruder.stderr[-3000:]
    (error,) = log_events(intruder.stdout, "config_error")
    assert error["error"] == (
        f"storage.checkpoints {uri}/ belongs to TrainingRun team-a/run-x (uid uid-x); "
        "give this run its own prefix"
    )
    assert not log_events(intruder.stdout, "train_step")
    assert _manifests(storage) == written  # nothing of x's was touched

    wrong = run_trainer(
        config(RUN_X, "x-1", 6),
        {**env, ENV_RESUME_FROM: last, ENV_RESUME_DIGEST: "sha256:" + "f" * 64},
    )
    assert wrong.returncode == EXIT_CONFIG_ERROR, wrong.stdout[-3000:] + wrong.stderr[-3000:]
    (error,) = log_events(wrong.stdout, "config_error")
    assert digest in error["error"] and "sha256:" + "f" * 64 in error["error"]

    again = run_trainer(config(RUN_X, "x-2", 6), {**env, ENV_RESUME_FROM: last, ENV_RESUME_DIGEST: digest})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert log_events(again.stdout, "checkpoints_prefix_owned")
    assert log_events(again.stdout, "resumed")[0]["step"] == 4
    assert sorted(int(r["step"]) for r in log_events(again.stdout, "train_step")) == [5, 6]
    assert _steps_with_manifest(storage) == [6]


def test_starting_from_another_runs_checkpoint_is_explicit(
    tmp_path: Path, make_config: ConfigFactory
) -> None:
    source = tmp_path / "runs" / "source"
    cache = str(tmp_path / "code-cache")
    cfg = make_config(
        storage=source,
        work_dir=tmp_path / "w0",
        max_steps=4,
        checkpoint_every=2,
        keep_last=2,
        cache_uri=cache,
    )
    cfg.run = RUN_Y
    first = Trainer(cfg).run()
    assert first.last_checkpoint is not None and first.last_checkpoint.step == 4
    theirs = first.last_checkpoint
    source_before = _manifests(LocalStorage(source))

    target = tmp_path / "runs" / "target"

    def trainer(work: str, env: PodEnv, reporter: _Recorder | None = None, max_steps: int = 6) -> Trainer:
        c = make_config(
            storage=target,
            work_dir=tmp_path / work,
            max_steps=max_steps,
            checkpoint_every=3,
            keep_last=2,
            cache_uri=cache,
        )
        c.run = RUN_X
        return Trainer(c, env, reporter=reporter)

    # another run's manifest as FERMATA_RESUME_FROM, not chosen by the user: refused
    with pytest.raises(TrainerConfigError, match=r"written by TrainingRun team-b/run-y \(uid uid-y\)"):
        trainer("w1", PodEnv(resume_from=theirs.uri, resume_digest=theirs.digest)).run()
    assert _steps_with_manifest(LocalStorage(target)) == []

    # chosen (spec.resumeFrom → FERMATA_RESUME_EXPLICIT=1): weights and optimizer from step 4
    reporter = _Recorder()
    outcome = trainer("w2", PodEnv(resume_from=theirs.uri, resume_explicit=True), reporter).run()
    assert outcome.state is TrainerState.completed and outcome.step == 6
    assert len(outcome.losses) == 6 and outcome.losses[:4] == first.losses
    messages = [s.progress.message or "" for s in reporter.statuses]
    assert any(f"started from another run's checkpoint {theirs.uri}" in m for m in messages)
    # status.lastCheckpoint only ever names the run's own checkpoints
    refs: list[CheckpointRef] = [s.last_checkpoint for s in reporter.statuses if s.last_checkpoint]
    assert refs and all(r.uri.startswith(str(target)) for r in refs)
    own = json.loads(LocalStorage(target).read_text("checkpoints/step-000000006/manifest.json"))
    assert own["run"]["uid"] == "uid-x" and own["startedFrom"] == theirs.uri
    assert _manifests(LocalStorage(source)) == source_before

    # the same pod env again (e.g. the operator had not seen the checkpoint yet): own wins
    reporter = _Recorder()
    resumed = trainer("w3", PodEnv(resume_from=theirs.uri, resume_explicit=True), reporter, max_steps=7).run()
    assert resumed.step == 7 and resumed.losses[:6] == outcome.losses
    assert reporter.statuses[-1].last_checkpoint is not None
    assert reporter.statuses[-1].last_checkpoint.step == 7


def test_trainer_on_a_formerly_shared_prefix_starts_from_its_own(
    tmp_path: Path, make_config: ConfigFactory
) -> None:
    """Checkpoints another run left under a prefix (written before claims existed) are neither
    resumed from nor pruned by the run that now holds it."""
    storage_dir = tmp_path / "shared"
    cache = str(tmp_path / "code-cache")
    cfg = make_config(
        storage=storage_dir,
        work_dir=tmp_path / "w0",
        max_steps=4,
        checkpoint_every=2,
        keep_last=1,
        cache_uri=cache,
    )
    cfg.run = RUN_Y
    Trainer(cfg).run()
    storage = LocalStorage(storage_dir)
    storage.delete(OWNER_KEY)  # as if it had never been claimed
    theirs = _manifests(storage)
    assert _steps_with_manifest(storage) == [4]

    cfg = make_config(
        storage=storage_dir,
        work_dir=tmp_path / "w1",
        max_steps=3,
        checkpoint_every=1,
        keep_last=1,
        cache_uri=cache,
    )
    cfg.run = RUN_X
    outcome = Trainer(cfg).run()
    assert outcome.step == 3 and len(outcome.losses) == 3  # fresh start, not y's step 4
    assert json.loads(storage.get_bytes(OWNER_KEY))["uid"] == "uid-x"
    assert _steps_with_manifest(storage) == [3, 4]  # keep 1 of its own; y's 4 untouched
    assert {k: v for k, v in _manifests(storage).items() if "step-000000004" in k} == theirs
