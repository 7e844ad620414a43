"""The images ``make images`` built, as the development kubelet runs them.

``tools/images/build.sh`` builds the operator and trainer images with buildah, keeps each image's
root file system as a buildah working container and describes them in
``.fermata/images/index.json``. :func:`load_index` reads that file into :class:`Image` records
(root file system, entrypoint, cmd, env, working directory, user); :func:`ensure_built` runs the
build script (a no-op, a few seconds, when the images' inputs are unchanged) and returns them.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fermata_dev.cluster import repo_root

OPERATOR = "operator"
TRAINER = "trainer"


class ImageError(RuntimeError):
    """The images could not be built or their index read."""


@dataclass(frozen=True)
class Image:
    ref: str
    rootfs: Path
    id: str
    size_bytes: int
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    working_dir: str = ""
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """``operator`` or ``trainer`` (from ``org.opencontainers.image.title``)."""
        return self.labels.get("org.opencontainers.image.title", "").removeprefix("fermata-")

    def uid_gid(self) -> tuple[int, int]:
        """The image's ``USER`` as numbers (the Dockerfile sets it numerically); root if unset."""
        user, _, group = self.user.partition(":")
        uid = int(user) if user.isdigit() else 0
        return uid, int(group) if group.isdigit() else uid

    @classmethod
    def from_entry(cls, ref: str, entry: Mapping[str, Any]) -> Image:
        env = dict(item.split("=", 1) for item in entry.get("env") or [] if "=" in item)
        return cls(
            ref=ref,
            rootfs=Path(entry["rootfs"]),
            id=str(entry.get("id", "")),
            size_bytes=int(entry.get("sizeBytes", 0)),
            entrypoint=list(entry.get("entrypoint") or []),
            cmd=list(entry.get("cmd") or []),
            env=env,
            working_dir=str(entry.get("workingDir") or ""),
            user=str(entry.get("user") or ""),
            labels=dict(entry.get("labels") or {}),
        )


def index_path(root: Path | None = None) -> Path:
    return (root or repo_root()) / ".fermata" / "images" / "index.json"


def load_index(path: Path | None = None) -> dict[str, Image]:
    """Image name → :class:`Image`, for every image whose root file system is present."""
    path = path or index_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ImageError(f"no image index at {path} (run `make images`): {exc}") from exc
    images = {ref: Image.from_entry(ref, entry) for ref, entry in data.items()}
    return {ref: image for ref, image in images.items() if (image.rootfs / "usr").is_dir()}


def ensure_built(root: Path | None = None, timeout: float = 3600.0) -> dict[str, Image]:
    """Build the images unless they are up to date, then return the index.
    ``FERMATA_IMAGES_AS_BUILT=1`` skips the check and uses the images as last built (a developer
    iterating on tests; CI never sets it)."""
    root = root or repo_root()
    if os.environ.get("FERMATA_IMAGES_AS_BUILT") == "1":
        return load_index(index_path(root))
    script = root / "tools" / "images" / "build.sh"
    proc = subprocess.run(
        ["bash", str(script)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ},
        check=False,
    )
    if proc.returncode != 0:
        raise ImageError(f"{script} failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    images = load_index(index_path(root))
    missing = {OPERATOR, TRAINER} - {image.target for image in images.values()}
    if missing:
        raise ImageError(f"the image index lacks {sorted(missing)} after a successful build")
    return images


def by_target(images: Mapping[str, Image], target: str) -> Image:
    for image in images.values():
        if image.target == target:
            return image
    raise ImageError(f"no {target} image in the index")
