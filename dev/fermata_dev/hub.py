"""A miniature pretrained MusicGen inside a real Hugging Face cache (tests and the local demo).

The files are the ones the Hub serves, in the cache layout ``huggingface_hub`` reads
(``<cache>/models--<org>--<name>/{refs/main, snapshots/<revision>/<file>}``):

* ``facebook/musicgen-small`` (or any id): ``state_dict.bin`` — audiocraft's release format,
  ``xp.cfg`` (a pickled OmegaConf config, as the Hub's files hold) + ``best_state`` in float16 —
  and ``compression_state_dict.bin`` (an EnCodec 32 kHz, 4 codebooks at 50 Hz: ``xp.cfg`` +
  ``best_state``).
* ``t5-base`` (the id audiocraft's ``T5Conditioner`` asks for): ``config.json``,
  ``model.safetensors`` (a one-layer T5 encoder with t5-base's width, 768, which the
  conditioner's projection expects), ``spiece.model`` (a sentencepiece model trained here on
  music words) and the ``tokenizer.json`` / ``tokenizer_config.json`` transformers writes.

The architecture is musicgen-small's (delayed pattern, cross-attention on T5 descriptions,
classifier-free-guidance dropout, T5 frozen) at miniature sizes, so ``MusicGen.get_pretrained``
with ``HF_HUB_OFFLINE=1`` goes through exactly the production code path in seconds on a CPU.
Nothing here is downloaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fermata_trainer.model_hub import repo_cache_dir
from fermata_trainer.model_hub import write_snapshot as cache_snapshot

MUSICGEN_SMALL = "facebook/musicgen-small"
T5_BASE = "t5-base"

#: words the miniature tokenizer knows as whole pieces (the prompts the tests write use them)
MUSIC_WORDS = (
    "amapiano jazz jazzy piano drums log bass guitar vocal vocals female male slow fast ambient "
    "techno house soulful deep classical violin strings rock pop electronic beat synth quiet loud "
    "calm dark bright track music song with and featuring at in minor major bpm a the of "
    "vocal-less groove percussion shaker kick soft hard dance"
).split()


@dataclass(frozen=True)
class MiniatureSpec:
    """Sizes of the miniature (musicgen-small: dim 1024, 24 layers, 16 heads, 2048 bins)."""

    model_id: str = MUSICGEN_SMALL
    seed: int = 0
    dim: int = 32
    heads: int = 2
    layers: int = 2
    bins: int = 64
    codebooks: int = 4
    sample_rate: int = 32000
    ratios: tuple[int, ...] = (8, 5, 4, 4)
    filters: int = 4
    latent_dim: int = 32
    segment_duration: float = 30.0
    text_encoder: str = T5_BASE
    t5_layers: int = 1
    revision: str = ""
    #: ``word_dropout`` of the T5 conditioner (musicgen-small trains with 0.3; audiocraft 1.3
    #: applies it whenever the LM is in train mode)
    word_dropout: float = 0.3


@dataclass
class MiniatureHub:
    """Where the miniature lives: ``hf_home`` is what ``HF_HOME`` should be set to."""

    hf_home: Path
    spec: MiniatureSpec
    revisions: dict[str, str] = field(default_factory=dict)

    @property
    def hub_cache(self) -> Path:
        return self.hf_home / "hub"

    def snapshot(self, repo_id: str) -> Path:
        return repo_cache_dir(self.hub_cache, repo_id) / "snapshots" / self.revisions[repo_id]

    def env(self) -> dict[str, str]:
        """The environment a trainer needs to load the miniature offline."""
        return {"HF_HOME": str(self.hf_home), "HF_HUB_OFFLINE": "1"}


def revision_of(repo_id: str, files: dict[str, Path]) -> str:
    """A 40-hex commit id derived from the content (stable for the same files)."""
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(files):
        digest.update(name.encode())
        digest.update(files[name].read_bytes())
    return digest.hexdigest()


def write_snapshot(hub_cache: Path, repo_id: str, files: dict[str, Path], revision: str = "") -> str:
    """Put ``files`` in the cache as ``repo_id``'s ``main`` revision (the product's writer)."""
    revision = revision or revision_of(repo_id, files)
    cache_snapshot(hub_cache, repo_id, revision, files)
    return revision


@contextlib.contextmanager
def offline_hub(hf_home: Path) -> Iterator[None]:
    """``huggingface_hub`` reading only ``hf_home``'s cache for the duration (it reads its
    settings at import time, so the constants are set too)."""
    from huggingface_hub import constants

    saved = (constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, constants.HF_HOME)
    constants.HF_HUB_OFFLINE = True
    constants.HF_HOME = str(hf_home)
    constants.HF_HUB_CACHE = str(hf_home / "hub")
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE, constants.HF_HUB_CACHE, constants.HF_HOME = saved


# ----------------------------------------------------------------------------- text encoder


def build_t5_files(out: Path, spec: MiniatureSpec) -> dict[str, Path]:
    """A one-layer T5 encoder (width 768) with a sentencepiece tokenizer trained on music words."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(spec.seed)
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(" ".join(rng.choices(MUSIC_WORDS, k=10)) for _ in range(3000)))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(out / "spiece"),
        vocab_size=len(MUSIC_WORDS) + 40,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        minloglevel=2,
    )
    corpus.unlink()
    spm_dir = out / "spm"
    spm_dir.mkdir()
    shutil.copyfile(out / "spiece.model", spm_dir / "spiece.model")
    (out / "spiece.vocab").unlink(missing_ok=True)
    tokenizer = T5Tokenizer.from_pretrained(str(spm_dir))  # converts the sentencepiece model
    shutil.rmtree(spm_dir)
    tokenizer.save_pretrained(str(out))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + 1)
        config = T5Config(
            vocab_size=len(tokenizer),
            d_model=768,
            d_kv=16,
            d_ff=64,
            num_layers=spec.t5_layers,
            num_heads=2,
            feed_forward_proj="relu",
        )
        T5EncoderModel(config).save_pretrained(str(out))
    return {p.name: p for p in sorted(out.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------- MusicGen


def lm_config(spec: MiniatureSpec) -> dict[str, Any]:
    """musicgen-small's ``xp.cfg`` (the parts audiocraft's builders read) at miniature sizes."""
    return {
        "device": "cpu",
        "dtype": "float32",
        "lm_model": "transformer_lm",
        "dataset": {"segment_duration": spec.segment_duration},
        "codebooks_pattern": {
            "modeling": "delay",
            "delay": {
                "delays": list(range(spec.codebooks)),
                "flatten_first": 0,
                "empty_initial": 0,
            },
        },
        "transformer_lm": {
            "n_q": spec.codebooks,
            "card": spec.bins,
            "dim": spec.dim,
            "num_heads": spec.heads,
            "num_layers": spec.layers,
            "hidden_scale": 4,
            "norm": "layer_norm",
            "norm_first": True,
            "bias_proj": False,
            "bias_ff": False,
            "bias_attn": False,
            "past_context": None,
            "causal": True,
            "custom": False,
            "memory_efficient": False,
            "attention_as_float32": False,
            "layer_scale": None,
            "positional_embedding": "sin",
            "xpos": False,
            "checkpointing": "none",
            "weight_init": "gaussian",
            "depthwise_init": "current",
            "zero_bias_init": True,
            "cross_attention": False,
            "dropout": 0.0,
        },
        "attribute_dropout": {},
        "classifier_free_guidance": {"training_dropout": 0.1, "inference_coef": 3.0},
        "fuser": {
            "cross_attention_pos_emb": False,
            "cross_attention_pos_emb_scale": 1,
            "sum": [],
            "prepend": [],
            "cross": ["description"],
            "input_interpolate": [],
        },
        "conditioners": {
            "args": {"merge_text_conditions_p": 0.25, "drop_desc_p": 0.5},
            "description": {
                "model": "t5",
                "t5": {
                    "name": spec.text_encoder,
                    "finetune": False,
                    "word_dropout": spec.word_dropout,
                    "normalize_text": False,
                },
            },
        },
    }


def compression_config(spec: MiniatureSpec) -> dict[str, Any]:
    """EnCodec 32 kHz's ``xp.cfg`` (SEANet + residual VQ, 50 Hz) at miniature sizes: the
    product's tiny EnCodec config with musicgen-small's rate and hop."""
    from fermata_trainer.model_loading import TinySpec, tiny_compression_config

    return tiny_compression_config(
        TinySpec(
            sample_rate=spec.sample_rate,
            ratios=spec.ratios,
            codebooks=spec.codebooks,
            bins=spec.bins,
            latent_dim=spec.latent_dim,
            filters=spec.filters,
        )
    )


def build_musicgen_files(out: Path, spec: MiniatureSpec) -> dict[str, Path]:
    """``state_dict.bin`` and ``compression_state_dict.bin`` as the Hub serves them.

    The T5 text encoder must already be in the (offline) cache: the LM is built with it.
    """
    import audiocraft
    from audiocraft.models import builders
    from omegaconf import OmegaConf

    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        lm_cfg = OmegaConf.create(lm_config(spec))
        lm = builders.get_lm_model(lm_cfg)
        comp_cfg = OmegaConf.create(compression_config(spec))
        compression = builders.get_compression_model(comp_cfg)
    state = {k: (v.half() if v.is_floating_point() else v) for k, v in lm.state_dict().items()}
    torch.save(
        {"best_state": state, "xp.cfg": lm_cfg, "version": audiocraft.__version__, "exported": True},
        out / "state_dict.bin",
    )
    torch.save(
        {
            "best_state": compression.state_dict(),
            "xp.cfg": comp_cfg,
            "version": audiocraft.__version__,
            "exported": True,
        },
        out / "compression_state_dict.bin",
    )
    return {name: out / name for name in ("state_dict.bin", "compression_state_dict.bin")}


def build_miniature_hub(hf_home: Path, spec: MiniatureSpec | None = None) -> MiniatureHub:
    """Write the miniature MusicGen and its T5 text encoder into the cache at ``hf_home``."""
    spec = spec or MiniatureSpec()
    hub = MiniatureHub(hf_home=hf_home, spec=spec)
    with tempfile.TemporaryDirectory(prefix="fermata-hub-") as tmp:
        t5_files = build_t5_files(Path(tmp) / "t5", spec)
        hub.revisions[spec.text_encoder] = write_snapshot(hub.hub_cache, spec.text_encoder, t5_files)
        with offline_hub(hf_home):
            lm_files = build_musicgen_files(Path(tmp) / "musicgen", spec)
        hub.revisions[spec.model_id] = write_snapshot(hub.hub_cache, spec.model_id, lm_files, spec.revision)
    return hub


def remove_tokenizer(hub: MiniatureHub, repo_id: str = T5_BASE) -> None:
    """Drop the text encoder's tokenizer files (its weights stay): the trap where transformers
    builds a tokenizer that maps every word to ``<unk>``."""
    snapshot = hub.snapshot(repo_id)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (snapshot / name).unlink(missing_ok=True)
