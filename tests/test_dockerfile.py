"""Static checks of the Dockerfile (the built images are checked in tests/images/).

Parses the Dockerfile into stages and instructions and checks what reading it can tell: both
targets, their non-root numeric user, entry points that really are console scripts, build-context
sources that exist, pinned base images and pins that agree with pyproject, and that the operator
image's dependency closure (resolved from the installed distributions) has no torch.
"""

from __future__ import annotations

import ast
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[str]:
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    if current:
        lines.append(current)
    return lines


def parse(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages by name (FROM images with ARGs expanded)."""
    args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for line in _logical_lines(text):
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and stage is None:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else str(len(stages))
            inherited = stages.get(image)
            stage = Stage(
                name=name, base=image, instructions=list(inherited.instructions) if inherited else []
            )
            stages[name] = stage
        else:
            assert stage is not None, f"{keyword} before FROM"
            stage.instructions.append((keyword, rest))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def pyproject() -> dict[str, object]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _exec_form(arg: str) -> list[str]:
    value = json.loads(arg)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arg
    return value


def test_both_targets_exist(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    assert {"operator", "trainer"} <= set(stages)


@pytest.mark.parametrize("target", ["operator", "trainer"])
def test_runs_as_numeric_non_root_user_1000(
    dockerfile: tuple[dict[str, str], dict[str, Stage]], target: str
) -> None:
    stage = dockerfile[1][target]
    user = stage.last("USER")
    assert user is not None, f"{target}: no USER"
    uid, _, gid = user.partition(":")
    assert uid == "1000" and gid in ("", "1000"), f"{target}: USER {user} (numeric 1000 wanted)"
    # Nothing after the USER switches back to root.
    keywords = [kw for kw, _ in stage.instructions]
    after = keywords[len(keywords) - 1 - keywords[::-1].index("USER") :]
    assert "RUN" not in after[1:], f"{target}: RUN after USER"


@pytest.mark.parametrize(("target", "script"), [("operator", "fermata"), ("trainer", "fermata-train")])
def test_entrypoints_are_console_scripts(
    dockerfile: tuple[dict[str, str], dict[str, Stage]],
    pyproject: dict[str, object],
    target: str,
    script: str,
) -> None:
    stage = dockerfile[1][target]
    entry = stage.last("ENTRYPOINT")
    assert entry is not None
    argv = _exec_form(entry)
    assert argv[0] == script
    scripts = pyproject["project"]["scripts"]  # type: ignore[index]
    assert script in scripts
    if target == "operator":
        assert argv[1:] == ["operator"], "operator image's entry point is `fermata operator`"
        cmd = _exec_form(stage.last("CMD") or "[]")
        assert cmd == ["--liveness", "http://0.0.0.0:8081/healthz"]


def test_every_build_context_source_exists(
    dockerfile: tuple[dict[str, str], dict[str, Stage]], pyproject: dict[str, object]
) -> None:
    """The source goes in through a bind mount of the build context (``/context``), copied to a
    scratch directory for the wheel build: every path named exists, and they are exactly the
    packages pyproject builds plus its own files."""
    _, stages = dockerfile
    for target in ("operator", "trainer"):
        runs = " ".join(stages[target].all("RUN"))
        assert "--mount=type=bind,source=.,target=/context" in runs, target
        named = set(re.findall(r"/context/([\w.\-/]+)", runs))
        for source in named:
            assert (ROOT / source).exists(), f"{target}: build context source {source} missing"
        where = set(pyproject["tool"]["setuptools"]["packages"]["find"]["where"])  # type: ignore[index]
        assert named == where | {"pyproject.toml", "README.md"}, (target, named)
    assert not [arg for stage in stages.values() for arg in stage.all("COPY")], "no COPY layers"


def test_base_images_are_pinned(dockerfile: tuple[dict[str, str], dict[str, Stage]]) -> None:
    _, stages = dockerfile
    for stage in stages.values():
        if stage.base in stages:
            continue  # FROM another stage
        image, _, tag = stage.base.rpartition(":")
        assert image and tag, f"{stage.name}: {stage.base} has no tag"
        assert tag != "latest", f"{stage.name}: {stage.base} not pinned"
        if image == "debian":
            # a Debian release (its point releases are security updates), the one make images
            # reproduces with debootstrap
            assert tag == "bookworm-slim", f"{stage.name}: {stage.base}"
        else:
            assert re.search(r"\d+\.\d+\.\d+", tag), f"{stage.name}: {stage.base} not pinned"


def _pip_installs(stage: Stage) -> list[str]:
    specs: list[str] = []
    for run in stage.all("RUN"):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["pip", "install"]:
                specs += [w for w in words[2:] if not w.startswith("-")]
    return specs


def test_pip_installs_are_pinned_and_match_pyproject(
    dockerfile: tuple[dict[str, str], dict[str, Stage]], pyproject: dict[str, object]
) -> None:
    _, stages = dockerfile
    operator = _pip_installs(stages["operator"])
    trainer = _pip_installs(stages["trainer"])
    assert "/tmp/src" in operator and not any("[" in s for s in operator), operator
    assert "/tmp/src[trainer]" in trainer
    extra = {
        canonicalize_name(Requirement(r).name): Requirement(r)
        for r in pyproject["project"]["optional-dependencies"]["trainer"]  # type: ignore[index]
    }
    for spec in operator + trainer:
        if spec.startswith("/tmp/src"):
            continue
        req = Requirement(spec)
        pins = [s for s in req.specifier if s.operator == "=="]
        assert pins, f"{spec} not pinned"
        same = extra.get(canonicalize_name(req.name))
        if same is not None and any(s.operator == "==" for s in same.specifier):
            assert str(same.specifier) == str(req.specifier), f"{spec} disagrees with pyproject {same}"
    # audiocraft and xformers must not pull torch 2.1 over the pinned one.
    trainer_runs = " ".join(stages["trainer"].all("RUN"))
    assert "--no-deps audiocraft==1.3.0 xformers==0.0.35" in trainer_runs


def _closure(dist_name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """Names of every distribution ``dist_name[extras]`` needs, from the installed metadata."""
    seen: set[str] = set()
    todo: list[tuple[str, frozenset[str]]] = [(dist_name, extras)]
    while todo:
        name, wanted = todo.pop()
        key = canonicalize_name(name)
        if key in seen and not wanted:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for raw in requires:
            req = Requirement(raw)
            envs = [{"extra": e} for e in wanted] or [{"extra": ""}]
            applies = req.marker is None or any(req.marker.evaluate(env) for env in envs)
            if applies and canonicalize_name(req.name) not in seen:
                todo.append((req.name, frozenset(req.extras)))
    return seen


def test_operator_image_dependencies_have_no_torch(pyproject: dict[str, object]) -> None:
    declared = [Requirement(r) for r in pyproject["project"]["dependencies"]]  # type: ignore[index]
    names = {canonicalize_name(r.name) for r in declared}
    assert not names & {"torch", "torchaudio", "audiocraft", "xformers"}
    assert all(any(s.operator == "==" for s in r.specifier) for r in declared), "operator deps pinned"
    # The whole closure `pip install .` brings in (as installed here), not just the top level.
    closure = _closure("fermata")
    heavy = {n for n in closure if n in {"torch", "torchaudio", "triton"} or n.startswith("nvidia-")}
    assert not heavy, f"the operator image would install {sorted(heavy)}"
    assert "kopf" in closure and "kubernetes" in closure
    # ...while the trainer extra does bring torch (so the check above is meaningful).
    assert "torch" in _closure("fermata", frozenset({"trainer"}))


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_images_carry_no_development_harness(
    dockerfile: tuple[dict[str, str], dict[str, Stage]], pyproject: dict[str, object]
) -> None:
    """dev/ (test control plane, test kubelet, local mode, demo, synthetic data) is for the
    checkout only: no image copies it, the product distribution does not package it, and no
    product module imports it (the images would not start)."""
    _, stages = dockerfile
    for stage in stages.values():
        for arg in stage.all("COPY"):
            sources = [w for w in shlex.split(arg) if not w.startswith("--")][:-1]
            assert not any(s.strip("./") == "dev" or s.startswith(("dev/", "./dev")) for s in sources), arg
    ignored = {line.strip().strip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert "dev" in ignored, ".dockerignore must exclude dev/"
    where = pyproject["tool"]["setuptools"]["packages"]["find"]["where"]  # type: ignore[index]
    assert "dev" not in where and "." not in where
    offenders = [
        f"{path.relative_to(ROOT)} imports {name}"
        for top in ("api", "operator", "trainer")
        for path in sorted((ROOT / top).rglob("*.py"))
        for name in _imported_modules(path)
        if name == "fermata_dev" or name.startswith("fermata_dev.")
    ]
    assert not offenders, offenders
