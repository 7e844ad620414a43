"""The production loading path, offline: ``model.base: facebook/musicgen-small``.

A miniature MusicGen (audiocraft's ``state_dict.bin`` with ``xp.cfg`` + float16 ``best_state``,
an EnCodec 32 kHz ``compression_state_dict.bin``) and a miniature ``t5-base`` (weights and a
sentencepiece tokenizer) sit in a real Hugging Face cache (:mod:`fermata_dev.hub`); the trainer
runs through the same code as in production: Hub fetch (or cache), T5 conditioner, mirror.
Hub failures are played by a real HTTP server on loopback (or a closed port); nothing leaves the
machine.
"""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fermata_api import EXIT_CONFIG_ERROR
from fermata_dev.hub import MUSICGEN_SMALL, MiniatureHub, remove_tokenizer
from fermata_dev.synthetic import SyntheticMtat
from tests.s3_fixture import S3Server
from tests.trainer.conftest import ConfigFactory
from tests.trainer.helpers import log_events, run_trainer, step_losses, trainer_env, write_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def hub(tmp_path: Path, miniature: MiniatureHub) -> MiniatureHub:
    """A copy of the miniature cache this test may change."""
    home = tmp_path / "hf"
    shutil.copytree(miniature.hf_home, home, symlinks=True)
    return MiniatureHub(home, miniature.spec, dict(miniature.revisions))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Hub(http.server.BaseHTTPRequestHandler):
    status = 503
    error_code = ""

    def _answer(self) -> None:
        self.send_response(self.status)
        if self.error_code:
            self.send_header("X-Error-Code", self.error_code)
            self.send_header("X-Error-Message", "Repository not found")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = _answer
    do_GET = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hub_server(request: pytest.FixtureRequest) -> Iterator[str]:
    """A Hub endpoint on loopback answering every request with ``request.param``."""
    status, error_code = request.param
    handler = type("Handler", (_Hub,), {"status": status, "error_code": error_code})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def pretrained_config(
    make_config: ConfigFactory, tmp_path: Path, base: str = MUSICGEN_SMALL, **kw: object
) -> Path:
    kw.setdefault("max_steps", 8)
    kw.setdefault("evaluate_every", 4)
    kw.setdefault("checkpoint_every", 4)
    config = make_config(**kw)
    config.model.base = base
    return write_config(config, tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json")


def error_of(stdout: str) -> str:
    events = log_events(stdout, "config_error") + log_events(stdout, "trainer_failed")
    return " ".join(str(e.get("error")) for e in events)


# ----------------------------------------------------------------------------- the happy path


def test_fine_tunes_musicgen_small_offline_and_mirrors_it(
    make_config: ConfigFactory, tmp_path: Path, hub: MiniatureHub
) -> None:
    path = pretrained_config(make_config, tmp_path)
    result = run_trainer(path, env=hub.env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    loaded = log_events(result.stdout, "model_loaded")[0]
    assert loaded["model"] == MUSICGEN_SMALL
    assert loaded["sample_rate"] == 32000 and loaded["frame_rate"] == 50.0
    assert loaded["text_encoders"] == ["t5-base"]
    assert log_events(result.stdout, "model_loading")[0]["origin"] == "hub"
    assert log_events(result.stdout, "text_tokenizer_checked")
    losses = step_losses(result.stdout)
    assert len(losses) == 8 and losses[8] < losses[1]

    # the base model and its text encoder were mirrored into the run's storage, digests and all
    manifest = json.loads((tmp_path / "storage" / "model" / "mirror.json").read_text())
    assert manifest["base"] == MUSICGEN_SMALL
    assert manifest["model"]["repo"] == MUSICGEN_SMALL
    assert manifest["model"]["revision"] == hub.revisions[MUSICGEN_SMALL]
    assert {o["name"] for o in manifest["model"]["objects"]} == {
        "state_dict.bin",
        "compression_state_dict.bin",
    }
    (encoder,) = manifest["textEncoders"]
    assert encoder["repo"] == "t5-base"
    assert {"config.json", "model.safetensors", "spiece.model", "tokenizer.json"} <= {
        o["name"] for o in encoder["objects"]
    }
    import hashlib

    for obj in manifest["model"]["objects"]:
        data = (tmp_path / "storage" / "model" / "hub" / MUSICGEN_SMALL / obj["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == obj["sha256"]

    # the final export of a model from the Hub loads with torch's default weights-only loading
    # (the Hub's own files pickle an OmegaConf config; the export carries YAML)
    import torch
    from audiocraft.models import MusicGen

    from fermata_dev.hub import offline_hub

    exports = sorted((tmp_path / "storage" / "exports").glob("step-*"))
    assert exports and (exports[-1] / "model_card.json").is_file()
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        torch.load(exports[-1] / name, map_location="cpu", weights_only=True)
    with offline_hub(hub.hf_home):
        served = MusicGen.get_pretrained(str(exports[-1]), device="cpu")
    served.set_generation_params(duration=0.2, top_k=16)
    with torch.no_grad():
        assert served.generate(["soulful amapiano piano"]).shape == (1, 1, 6400)

    # a later pod: an empty cache and a Hub that refuses connections; it loads from the mirror
    empty = {"HF_HOME": str(tmp_path / "hf-new-pod"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    again = run_trainer(pretrained_config(make_config, tmp_path, max_steps=10), env=empty)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert log_events(again.stdout, "model_restored_from_mirror")
    assert not log_events(again.stdout, "hub_fetched")
    assert not log_events(again.stdout, "hub_unavailable_using_cache")
    assert log_events(again.stdout, "resumed")[0]["step"] == 8
    assert set(step_losses(again.stdout)) == {9, 10}


def test_corrupt_mirror_is_fetched_again(
    make_config: ConfigFactory, tmp_path: Path, hub: MiniatureHub
) -> None:
    path = pretrained_config(make_config, tmp_path, max_steps=2, evaluate_every=100, checkpoint_every=100)
    assert run_trainer(path, env=hub.env()).returncode == 0
    mirrored = tmp_path / "storage" / "model" / "hub" / "t5-base" / "spiece.model"
    mirrored.write_bytes(b"not a sentencepiece model")
    again = run_trainer(pretrained_config(make_config, tmp_path, max_steps=3), env=hub.env())
    assert again.returncode == 0, again.stdout[-3000:]
    assert log_events(again.stdout, "model_mirror_corrupt")
    assert log_events(again.stdout, "model_mirrored")  # written again, intact
    manifest = json.loads((tmp_path / "storage" / "model" / "mirror.json").read_text())
    (encoder,) = manifest["textEncoders"]
    import hashlib

    spiece = next(o for o in encoder["objects"] if o["name"] == "spiece.model")
    assert hashlib.sha256(mirrored.read_bytes()).hexdigest() == spiece["sha256"]


def test_staged_models_need_no_hub(
    make_config: ConfigFactory,
    tmp_path: Path,
    hub: MiniatureHub,
    s3_server: S3Server,
) -> None:
    """Air-gapped: `fermata-train stage-models` copies the model and its T5 encoder to S3 once;
    a run pointing there, with an empty cache and no Hub at all, never asks the Hub."""
    bucket = s3_server.make_bucket("staged-models")
    stage = subprocess.run(
        [
            sys.executable,
            "-m",
            "fermata_trainer.cli",
            "stage-models",
            "--to",
            f"s3://{bucket}/models",
            "--model",
            MUSICGEN_SMALL,
        ],
        env=trainer_env({**s3_server.env(), **hub.env()}),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert stage.returncode == 0, stage.stderr[-3000:]
    assert stage.stdout.split("\t")[0] == MUSICGEN_SMALL
    base = f"s3://{bucket}/models/{MUSICGEN_SMALL}"
    keys = {o["Key"] for o in s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]}
    assert f"models/{MUSICGEN_SMALL}/mirror.json" in keys
    assert f"models/{MUSICGEN_SMALL}/hub/t5-base/spiece.model" in keys

    no_hub = {
        **s3_server.env(),
        "HF_HOME": str(tmp_path / "hf-air-gapped"),
        "HF_HUB_OFFLINE": "1",
        "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
    }
    result = run_trainer(pretrained_config(make_config, tmp_path, base=base, max_steps=3), env=no_hub)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert log_events(result.stdout, "model_restored_from_mirror")[0]["base"] == MUSICGEN_SMALL
    assert log_events(result.stdout, "model_loaded")[0]["text_encoders"] == ["t5-base"]
    # the staged mirror is the run's mirror: nothing copied again
    assert not (tmp_path / "storage" / "model" / "mirror.json").exists()


# ----------------------------------------------------------------------------- the traps


def test_text_encoder_without_tokenizer_is_refused(
    make_config: ConfigFactory, tmp_path: Path, hub: MiniatureHub
) -> None:
    """transformers 5 builds a tokenizer mapping every word to <unk> when the tokenizer files
    are missing and the weights are not: every prompt would look the same."""
    remove_tokenizer(hub)
    result = run_trainer(pretrained_config(make_config, tmp_path), env=hub.env())
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout[-3000:]
    error = error_of(result.stdout)
    assert "maps every word" in error and "<unk>" in error and "t5-base" in error
    assert not step_losses(result.stdout)


def test_offline_without_the_model_is_permanent(make_config: ConfigFactory, tmp_path: Path) -> None:
    env = {"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"}
    result = run_trainer(pretrained_config(make_config, tmp_path), env=env)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout[-3000:]
    assert "HF_HUB_OFFLINE=1" in error_of(result.stdout) and MUSICGEN_SMALL in error_of(result.stdout)


def test_unreachable_hub_is_transient_and_quick(make_config: ConfigFactory, tmp_path: Path) -> None:
    """No network, no offline flag: one probe, then exit 1 (the pod is retried), not minutes of
    retries ending in a permanent failure."""
    env = {"HF_HOME": str(tmp_path / "empty-hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    result = run_trainer(pretrained_config(make_config, tmp_path), env=env, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "unreachable" in error_of(result.stdout)


def test_unreachable_hub_with_a_complete_cache_loads_the_cache(
    make_config: ConfigFactory, tmp_path: Path, hub: MiniatureHub
) -> None:
    env = {"HF_HOME": str(hub.hf_home), "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"}
    result = run_trainer(pretrained_config(make_config, tmp_path, max_steps=2), env=env, timeout=180)
    assert result.returncode == 0, result.stdout[-3000:]
    assert {e["repo"] for e in log_events(result.stdout, "hub_unavailable_using_cache")} == {
        MUSICGEN_SMALL,
        "t5-base",
    }


@pytest.mark.parametrize("hub_server", [(404, "RepoNotFound")], indirect=True)
def test_unknown_model_id_is_permanent(make_config: ConfigFactory, tmp_path: Path, hub_server: str) -> None:
    env = {"HF_HOME": str(tmp_path / "empty-hf"), "HF_ENDPOINT": hub_server}
    result = run_trainer(pretrained_config(make_config, tmp_path, base="facebook/musicgen-nope"), env=env)
    assert result.returncode == EXIT_CONFIG_ERROR, result.stdout[-3000:]
    assert "no such model" in error_of(result.stdout)


@pytest.mark.parametrize("hub_server", [(503, "")], indirect=True)
def test_failing_hub_is_transient(make_config: ConfigFactory, tmp_path: Path, hub_server: str) -> None:
    env = {"HF_HOME": str(tmp_path / "empty-hf"), "HF_ENDPOINT": hub_server}
    result = run_trainer(pretrained_config(make_config, tmp_path), env=env, timeout=120)
    assert result.returncode == 1, result.stdout[-3000:]
    assert "unreachable or failing" in error_of(result.stdout)


def test_miniature_is_musicgen_smalls_format(miniature: MiniatureHub, shared_mtat: SyntheticMtat) -> None:
    """The files hold what the Hub's do: xp.cfg + float16 best_state; an EnCodec at 32 kHz."""
    import torch

    snapshot = miniature.snapshot(MUSICGEN_SMALL)
    pkg = torch.load(snapshot / "state_dict.bin", map_location="cpu", weights_only=False)
    assert {"xp.cfg", "best_state"} <= set(pkg)
    assert pkg["xp.cfg"]["conditioners"]["description"]["t5"]["name"] == "t5-base"
    assert all(t.dtype == torch.float16 for t in pkg["best_state"].values() if t.is_floating_point())
    comp = torch.load(snapshot / "compression_state_dict.bin", map_location="cpu", weights_only=False)
    assert comp["xp.cfg"]["sample_rate"] == 32000 and {"best_state"} <= set(comp)
    # torch >= 2.6 refuses the pickled config by default: the trainer's loader must allow it
    with pytest.raises(Exception, match="[Ww]eights only"):
        torch.load(snapshot / "state_dict.bin", map_location="cpu")


@pytest.mark.parametrize(
    ("repo", "revision"), [("t5-base", "../../../escape"), ("../t5", "abc"), ("a/b/c", "abc")]
)
def test_mirror_manifest_cannot_write_outside_the_cache(tmp_path: Path, repo: str, revision: str) -> None:
    from fermata_trainer.errors import TrainerConfigError
    from fermata_trainer.model_mirror import MIRROR_FORMAT_VERSION, restore_mirror
    from fermata_trainer.storage import open_storage

    storage = open_storage(str(tmp_path / "mirror"))
    manifest = {
        "formatVersion": MIRROR_FORMAT_VERSION,
        "base": "x",
        "model": {"kind": "hub", "repo": repo, "revision": revision, "objects": []},
    }
    with pytest.raises(TrainerConfigError, match="bad repository"):
        restore_mirror(storage, manifest, tmp_path / "cache", tmp_path / "work")
    assert not (tmp_path / "escape").exists()
