"""The images `make images` builds from the Dockerfile, checked as a cluster would run them.

Each check runs a container from the image's root file system the way the development kubelet
does (:mod:`fermata_dev.podexec`: overlay root, read-only when the pod says so, volumes
bind-mounted, the image's user), so what passes here is what a pod gets.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fermata_dev.images import OPERATOR, TRAINER, Image, by_target
from fermata_dev.podexec import ContainerSpec, Mount

ROOT = Path(__file__).resolve().parents[2]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]

pytestmark = [pytest.mark.images]


def run_in(
    image: Image,
    tmp_path: Path,
    argv: list[str],
    *,
    read_only_root: bool = True,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a container of ``image`` as its own user, read-only root, /tmp an emptyDir."""
    scratch = tmp_path / f"c{len(list(tmp_path.glob('c*')))}"
    tmp = scratch.with_suffix(".tmp")
    tmp.mkdir(parents=True)
    tmp.chmod(0o777)
    uid, gid = image.uid_gid()
    spec = ContainerSpec(
        rootfs=str(image.rootfs),
        scratch=str(scratch),
        argv=argv,
        env={**image.env, **(env or {})},
        uid=uid,
        gid=gid,
        working_dir=image.working_dir or "/",
        read_only_root=read_only_root,
        mounts=[Mount(str(tmp), "/tmp")],
    )
    spec_path = scratch.with_suffix(".json")
    spec_path.write_text(spec.to_json())
    return subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-m",
            "fermata_dev.podexec",
            str(spec_path),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def operator_image(built_images: dict[str, Image]) -> Image:
    return by_target(built_images, OPERATOR)


@pytest.fixture(scope="module")
def trainer_image(built_images: dict[str, Image]) -> Image:
    return by_target(built_images, TRAINER)


@pytest.mark.parametrize("target", [OPERATOR, TRAINER])
def test_runs_as_uid_1000_with_nothing_writable_but_its_volumes(
    built_images: dict[str, Image], target: str, tmp_path: Path
) -> None:
    image = by_target(built_images, target)
    assert image.user == "1000:1000"
    probe = (
        "id -u; id -g; "
        "for d in / /opt/fermata /home/fermata /etc /var; do "
        '  if touch "$d/.w" 2>/dev/null; then echo "writable $d"; fi; '
        "done; touch /tmp/.w && echo tmp-ok"
    )
    result = run_in(image, tmp_path, ["sh", "-c", probe])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.split()
    assert lines[:2] == ["1000", "1000"]
    assert "writable" not in result.stdout, result.stdout
    assert lines[-1] == "tmp-ok"


def test_operator_entrypoint(operator_image: Image, tmp_path: Path) -> None:
    assert operator_image.entrypoint == ["fermata", "operator"]
    result = run_in(operator_image, tmp_path, [*operator_image.entrypoint, "--help"])
    assert result.returncode == 0, result.stderr
    assert "--peering" in result.stdout and "--liveness" in result.stdout


def test_operator_image_is_small_and_has_no_torch(operator_image: Image, tmp_path: Path) -> None:
    result = run_in(
        operator_image,
        tmp_path,
        ["python", "-c", "import importlib.util as u, kopf, fermata_operator; print(u.find_spec('torch'))"],
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    assert operator_image.size_bytes < 400 * 2**20, operator_image.size_bytes


def test_trainer_entrypoint_and_cli(trainer_image: Image, tmp_path: Path) -> None:
    assert trainer_image.entrypoint == ["fermata-train"] and trainer_image.cmd == ["run"]
    result = run_in(trainer_image, tmp_path, [*trainer_image.entrypoint, "--help"])
    assert result.returncode == 0, result.stderr
    for command in ("run", "prepare", "tiny-config"):
        assert command in result.stdout


TRAINER_PROBE = """
import math, subprocess, tempfile
import numpy as np, soundfile, torch, torchaudio, av
import audiocraft
from audiocraft.modules.transformer import StreamingTransformer
from fermata_trainer import cli
assert not torch.cuda.is_available()
torch.manual_seed(0)
layer = StreamingTransformer(d_model=16, num_heads=2, num_layers=1, dim_feedforward=32)
out = layer(torch.randn(1, 4, 16))
out.sum().backward()
print("transformer", tuple(out.shape))
wav = np.sin(2 * math.pi * 440 * np.arange(16000) / 16000).astype("float32")
with tempfile.TemporaryDirectory() as d:
    soundfile.write(f"{d}/a.wav", wav, 16000)
    subprocess.run(["ffmpeg", "-v", "error", "-i", f"{d}/a.wav", f"{d}/a.mp3"], check=True)
    with av.open(f"{d}/a.mp3") as f:
        frames = sum(frame.samples for frame in f.decode(audio=0))
    print("mp3", frames > 15000)
print("libsndfile", soundfile.__libsndfile_version__)
print("audiocraft", audiocraft.__version__, "torch", torch.__version__)
"""


def test_trainer_imports_torch_audiocraft_and_decodes_audio_on_the_cpu(
    trainer_image: Image, tmp_path: Path
) -> None:
    result = run_in(trainer_image, tmp_path, ["python", "-c", TRAINER_PROBE])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "transformer (1, 4, 16)" in out
    assert "mp3 True" in out
    assert "libsndfile 1." in out
    assert "audiocraft 1.3.0 torch 2.11.0" in out


@pytest.mark.parametrize("target", [OPERATOR, TRAINER])
def test_nothing_of_the_build_is_left_behind(built_images: dict[str, Image], target: str) -> None:
    root = by_target(built_images, target).rootfs
    for tool in ("gcc", "cc", "g++", "c++", "make", "ld"):
        assert not (root / "usr" / "bin" / tool).exists(), tool
    assert not [p for p in (root / "var" / "lib" / "apt" / "lists").glob("*") if p.name != "partial"]
    assert not list((root / "var" / "cache" / "apt").glob("*.bin"))
    # the pip cache is a cache mount: at most its empty mount point is left
    assert not [p for p in (root / "root" / ".cache").rglob("*") if not p.is_dir()]
    assert not (root / "tmp" / "src").exists() and not (root / "src").exists()
    assert not (root / "etc" / "pip.conf").exists()  # a build secret, never a layer
    assert not (root / "etc" / "ssl" / "certs" / "build-ca.crt").exists()


@pytest.mark.parametrize("target", [OPERATOR, TRAINER])
def test_oci_labels(built_images: dict[str, Image], target: str) -> None:
    labels = by_target(built_images, target).labels
    assert labels["org.opencontainers.image.source"].startswith("https://github.com/")
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.title"] == f"fermata-{target}"


def test_the_chart_names_the_built_operator_image(operator_image: Image) -> None:
    values = (ROOT / "charts" / "fermata" / "values.yaml").read_text()
    repository = operator_image.ref.rsplit(":", 1)[0]
    assert f"repository: {repository}" in values
    chart = (ROOT / "charts" / "fermata" / "Chart.yaml").read_text()
    assert f'appVersion: "{VERSION}"' in chart or f"appVersion: {VERSION}" in chart


def test_a_missing_command_is_a_start_error_not_a_hang(operator_image: Image, tmp_path: Path) -> None:
    result = run_in(operator_image, tmp_path, ["no-such-program"])
    assert result.returncode == 127
    assert "cannot run 'no-such-program'" in result.stderr


@pytest.fixture(autouse=True)
def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.fail("the image checks need root (mount namespace, overlay, chroot), as `make test` has")
