"""The development container runner's path rule: a container's path never leads out of its root."""

from __future__ import annotations

from pathlib import Path

from fermata_dev.podexec import ContainerSpec, Mount, _inside


def test_symlinks_are_followed_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "run").mkdir(parents=True)
    (root / "usr" / "lib").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # as in Debian images
    (root / "lib").symlink_to("usr/lib")  # relative, merged /usr
    (root / "etc").mkdir()
    (root / "etc" / "loop").symlink_to("/etc/loop")
    assert _inside(root, "/var/run/secrets/x") == root / "run" / "secrets" / "x"
    assert _inside(root, "/lib/python3") == root / "usr" / "lib" / "python3"
    assert _inside(root, "/../../../etc/passwd") == root / "etc" / "passwd"
    assert _inside(root, "/usr/lib/../../var/run/a") == root / "run" / "a"
    try:
        _inside(root, "/etc/loop/x")
    except OSError as exc:
        assert "symbolic links" in str(exc)
    else:
        raise AssertionError("a symlink loop must be an error")


def test_container_spec_round_trips() -> None:
    spec = ContainerSpec(
        rootfs="/r", scratch="/s", argv=["a"], env={"A": "1"}, uid=1000, gid=1000,
        mounts=[Mount("/src", "/dst", True)], forward_ports=[443],
    )  # fmt: skip
    assert ContainerSpec.from_json(spec.to_json()) == spec
