"""The Hugging Face Hub and its cache: what a MusicGen base and its text encoders need.

``MusicGen.get_pretrained("facebook/musicgen-small")`` reads ``state_dict.bin`` and
``compression_state_dict.bin`` from the Hub, and the LM's T5 conditioner reads ``t5-base``
(weights and sentencepiece tokenizer) through transformers. Left to themselves, those libraries
retry an unreachable Hub for minutes per file, and without tokenizer files transformers builds a
tokenizer that maps every word to ``<unk>``. So the trainer does the Hub part itself:

* :func:`fetch_model` / :func:`fetch_text_encoder` put the files in the cache first: one probe
  request without retries says whether the Hub answers; an unknown id or a missing file is
  permanent (:class:`~fermata_trainer.errors.TrainerConfigError`, exit 2), an unreachable or
  failing Hub is transient (:class:`HubUnavailableError`, exit 1, the pod is retried) unless the
  cache already holds everything, and with ``HF_HUB_OFFLINE=1`` only the cache is read;
* loading then runs with the Hub switched off (:func:`hub_offline`), so nothing downloads or
  retries behind the trainer's back;
* :func:`check_text_tokenizer` refuses a text encoder whose tokenizer does not know words.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fermata_trainer.errors import TrainerConfigError
from fermata_trainer.logging_setup import get_logger

log = get_logger(__name__)

#: What a MusicGen release holds.
MUSICGEN_FILES = ("state_dict.bin", "compression_state_dict.bin")
#: What transformers reads for a T5 encoder and its tokenizer (the weights: safetensors first).
TEXT_ENCODER_FILES = (
    "config.json",
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
TEXT_ENCODER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
#: A sentence any music text encoder's tokenizer must split into known pieces.
TOKENIZER_PROBE = "piano drums and bass in a slow jazz track"
#: Seconds the probe request may take.
PROBE_TIMEOUT = 15.0


class HubUnavailableError(Exception):
    """The Hub could not be reached or failed (transient: the pod is retried)."""


@dataclass(frozen=True)
class CachedRepo:
    """A repository's files in the local Hugging Face cache."""

    repo_id: str
    revision: str
    snapshot: Path
    files: tuple[str, ...]

    def paths(self) -> dict[str, Path]:
        return {name: self.snapshot / name for name in self.files}


# ----------------------------------------------------------------------------- the cache


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def repo_cache_dir(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def cached_repo(repo_id: str, required: tuple[str, ...], any_of: tuple[str, ...] = ()) -> CachedRepo | None:
    """``repo_id``'s ``main`` snapshot in the cache if it holds every ``required`` file and one
    of ``any_of`` (when given)."""
    root = repo_cache_dir(hub_cache(), repo_id)
    ref = root / "refs" / "main"
    if not ref.is_file():
        return None
    revision = ref.read_text().strip()
    snapshot = root / "snapshots" / revision
    if not all((snapshot / name).is_file() for name in required):
        return None
    if any_of and not any((snapshot / name).is_file() for name in any_of):
        return None
    files = tuple(sorted(p.name for p in snapshot.iterdir() if p.is_file()))
    return CachedRepo(repo_id, revision, snapshot, files)


def write_snapshot(cache: Path, repo_id: str, revision: str, files: dict[str, Path]) -> CachedRepo:
    """Put ``files`` (name → local file) into ``cache`` as ``repo_id``'s ``main`` revision, in
    ``huggingface_hub``'s layout (blobs named by sha256, snapshot entries linking to them)."""
    root = repo_cache_dir(cache, repo_id)
    snapshot = root / "snapshots" / revision
    for directory in (root / "blobs", root / "refs", snapshot):
        directory.mkdir(parents=True, exist_ok=True)
    for name, path in files.items():
        blob = root / "blobs" / _sha256_of(path)
        if not blob.exists():
            tmp = blob.with_name(f"{blob.name}.{os.getpid()}.incomplete")
            shutil.copyfile(path, tmp)
            os.replace(tmp, blob)
        # a new link replaces the old one atomically (ranks of one pod may restore together)
        tmp_link = snapshot / f".{name}.{os.getpid()}.link"
        tmp_link.unlink(missing_ok=True)
        tmp_link.symlink_to(Path("..") / ".." / "blobs" / blob.name)
        os.replace(tmp_link, snapshot / name)
    (root / "refs" / "main").write_text(revision)
    return CachedRepo(repo_id, revision, snapshot, tuple(sorted(files)))


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """The Hub switched off for the duration: libraries read only the cache.

    ``huggingface_hub`` reads ``HF_HUB_OFFLINE`` once, at import; its module constant is what
    every download call consults, so that is what is set (and the variable, for subprocesses).
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    saved_env = os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


# ----------------------------------------------------------------------------- the Hub


def probe(repo_id: str, filename: str) -> None:
    """One request for ``filename``'s metadata, no retries. Raises :class:`TrainerConfigError`
    for an unknown repository or file, :class:`HubUnavailableError` when the Hub does not answer
    or fails."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    url = hf_hub_url(repo_id, filename)
    try:
        get_hf_file_metadata(url, timeout=PROBE_TIMEOUT, retry_on_errors=False)
    except GatedRepoError as exc:
        raise TrainerConfigError(
            f"model {repo_id}: the Hub refuses access (gated; set HF_TOKEN from a Secret): {_first_line(exc)}"
        ) from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise TrainerConfigError(f"model {repo_id}: no such model on the Hub: {_first_line(exc)}") from None
    except EntryNotFoundError:
        raise TrainerConfigError(f"model {repo_id}: the Hub has no {filename} for it") from None
    except Exception as exc:  # connection, timeout, 5xx, 429: the Hub, not the model
        raise HubUnavailableError(
            f"the Hugging Face Hub ({url.split('/' + repo_id)[0]}) is unreachable or failing "
            f"({type(exc).__name__}: {_first_line(exc)}); the pod will be retried. Without network, "
            "stage the model into S3 (`fermata-train stage-models`) and point model.base at it"
        ) from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _fetch(
    repo_id: str, filenames: tuple[str, ...], required: tuple[str, ...], any_of: tuple[str, ...]
) -> CachedRepo:
    cached = cached_repo(repo_id, required, any_of)
    if offline():
        if cached is None:
            raise TrainerConfigError(
                f"model {repo_id}: HF_HUB_OFFLINE=1 and the Hugging Face cache at {hub_cache()} "
                f"does not hold it (needs {', '.join(required)}"
                + (f" and one of {', '.join(any_of)}" if any_of else "")
                + "); stage it into S3 (`fermata-train stage-models`) and point model.base there"
            )
        return cached
    try:
        probe(repo_id, required[0])
    except HubUnavailableError as exc:
        if cached is None:
            raise
        log.warning("hub_unavailable_using_cache", repo=repo_id, revision=cached.revision, error=str(exc))
        return cached
    from huggingface_hub import snapshot_download

    snapshot_download(repo_id, allow_patterns=list(filenames))
    fetched = cached_repo(repo_id, required, any_of)
    if fetched is None:
        raise TrainerConfigError(f"model {repo_id}: the Hub has no {' / '.join(any_of or required)} for it")
    log.info("hub_fetched", repo=repo_id, revision=fetched.revision, files=list(fetched.files))
    return fetched


def fetch_model(repo_id: str) -> CachedRepo:
    """A MusicGen release (``state_dict.bin`` + ``compression_state_dict.bin``) in the cache."""
    return _fetch(repo_id, MUSICGEN_FILES, MUSICGEN_FILES, ())


def fetch_text_encoder(repo_id: str) -> CachedRepo:
    """A text encoder (config, weights, tokenizer) in the cache."""
    return _fetch(
        repo_id,
        TEXT_ENCODER_FILES + TEXT_ENCODER_WEIGHTS[:1],
        ("config.json",),
        TEXT_ENCODER_WEIGHTS,
    )


def text_encoders_of(lm_config: Any) -> list[str]:
    """The Hugging Face ids of the T5 text encoders an LM config's conditioners load."""
    conditioners = _get(lm_config, "conditioners") or {}
    names: list[str] = []
    for key in list(conditioners.keys()):
        if key == "args":
            continue
        cond = conditioners[key] or {}
        if _get(cond, "model") == "t5":
            name = _get(_get(cond, "t5") or {}, "name")
            if name and str(name) not in names:
                names.append(str(name))
    return names


def _get(obj: Any, key: str) -> Any:
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        return None
    except Exception:  # OmegaConf's missing-key errors
        return None


# ----------------------------------------------------------------------------- tokenizers


def check_text_tokenizer(lm: Any) -> None:
    """Refuse a T5 conditioner whose tokenizer maps ordinary words to ``<unk>`` (what
    transformers builds, silently, when the tokenizer files are missing): every prompt would
    look the same to the model."""
    conditioners = getattr(getattr(lm, "condition_provider", None), "conditioners", {}) or {}
    for name, conditioner in conditioners.items():
        tokenizer = getattr(conditioner, "t5_tokenizer", None)
        if tokenizer is None:
            continue
        ids = list(tokenizer(TOKENIZER_PROBE)["input_ids"])
        special = {tokenizer.unk_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id}
        known = [i for i in ids if i not in special and tokenizer.convert_ids_to_tokens(i) not in ("▁", "")]
        unknown = sum(1 for i in ids if i == tokenizer.unk_token_id)
        if not known:
            encoder = getattr(conditioner, "name", "?")
            raise TrainerConfigError(
                f"text encoder {encoder} (conditioner {name!r}): its tokenizer maps every word of "
                f"{TOKENIZER_PROBE!r} to <unk> ({unknown} of {len(ids)} tokens; vocabulary "
                f"{len(tokenizer)}), so every prompt would look the same to the model. Its "
                "tokenizer files (spiece.model / tokenizer.json) are missing from the Hugging "
                "Face cache or the model mirror; fetch the text encoder again"
            )
        log.info("text_tokenizer_checked", conditioner=name, vocabulary=len(tokenizer), unknown=unknown)
