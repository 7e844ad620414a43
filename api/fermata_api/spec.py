"""``TrainingRun.spec``: what a user asks for.

Every field's ``description`` becomes its ``kubectl explain`` text; CEL rules attached with
:func:`~fermata_api.base.cel` become API-server validation where fields interact. The sections
the trainer consumes (model, dataset, training, evaluation, storage) are rendered into its
config file (:class:`fermata_api.contract.TrainerConfig`) unchanged.
"""

from __future__ import annotations

import re
from enum import Enum
from typing import Annotated, Any

from pydantic import AfterValidator, Field, model_validator
from pydantic.config import JsonDict

from fermata_api.base import ApiModel, Duration, cel, field_rules, pattern_rule
from fermata_api.pod import PodOverrides, ServiceAccountSpec

# ----------------------------------------------------------------------------- Kubernetes names
# The API server checks these at admission (as CEL rules with readable messages) so that a bad
# name is refused when the run is applied, not when the operator creates the pod. Written
# without backslashes: each is valid for RE2 (Kubernetes), Rust's regex (pydantic) and as a CEL
# string literal.

_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
#: A DNS-1123 subdomain (Secret, PriorityClass names); at most 253 characters.
DNS_SUBDOMAIN = f"^{_DNS_LABEL}([.]{_DNS_LABEL})*$"
_LABEL_NAME = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
#: A label key: an optional DNS-subdomain prefix (≤ 253) and '/', then a name of ≤ 63 characters.
LABEL_KEY = f"^({_DNS_LABEL}([.]{_DNS_LABEL})*/)?{_LABEL_NAME}$"
#: A label value: empty, or ≤ 63 letters, digits, '-', '_', '.', alphanumeric at both ends.
LABEL_VALUE = f"^({_LABEL_NAME})?$"
#: node.kubernetes.io/instance-type values (also used as label values).
INSTANCE_TYPE = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_DOMAIN_PART = "[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?"
_PATH_PART = "[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*"
#: An image reference: [registry[:port]/]repository[:tag][@algorithm:digest], as the
#: distribution/reference grammar has it (without IPv6 registry hosts).
IMAGE_REFERENCE = (
    f"^({_DOMAIN_PART}([.]{_DOMAIN_PART})*(:[0-9]+)?/)?{_PATH_PART}(/{_PATH_PART})*"
    "(:[A-Za-z0-9_][-A-Za-z0-9_.]{0,127})?"
    "(@[A-Za-z][A-Za-z0-9]*([-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?$"
)
_LABEL_CHARS = "at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
_LABEL_KEY_MESSAGE = (
    "an optional DNS subdomain prefix (at most 253 characters) and '/', then a name of " + _LABEL_CHARS
)
#: ``spec.resumeFrom``: a checkpoint manifest, as ``status.lastCheckpoint.uri`` names one.
RESUME_FROM_PATTERN = "^[^ ]+/checkpoints/step-[0-9]{9}/manifest[.]json$"
#: A label key's prefix is a DNS subdomain: at most 253 characters before the '/'.
_PREFIX_LENGTH = "indexOf('/') <= 253"


def _quantity(field: str, examples: str) -> JsonDict:
    """CEL rules of a resource quantity field: a Kubernetes quantity, greater than zero."""
    return field_rules(
        ("isQuantity(self)", f"{field} must be a Kubernetes quantity such as {examples}"),
        (
            "!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))",
            f"{field} must be greater than 0",
        ),
    )


def _check_node_selector(value: dict[str, str]) -> dict[str, str]:
    for key, label in value.items():
        prefix = key.rpartition("/")[0]
        if not re.match(LABEL_KEY, key) or len(prefix) > 253:
            raise ValueError(f"nodeSelector key {key!r} is not a Kubernetes label key")
        if not re.match(LABEL_VALUE, label):
            raise ValueError(f"nodeSelector value {label!r} of {key!r} is not a Kubernetes label value")
    return value


def _quantity_field(field: str, default: str, examples: str, description: str) -> Any:
    """A resource quantity (cpu, memory, scratch size): a Kubernetes quantity greater than 0."""
    return Field(
        default=default,
        min_length=1,
        max_length=64,
        json_schema_extra=_quantity(field, examples),
        description=description,
    )


#: A pod's required node labels: Kubernetes label keys and values.
NodeSelector = Annotated[
    dict[str, Annotated[str, Field(max_length=63)]], AfterValidator(_check_node_selector)
]


def _no_labels() -> dict[str, str]:
    return {}


def _node_selector_field(field: str, description: str) -> Any:
    return Field(
        default_factory=_no_labels,
        max_length=32,
        json_schema_extra=field_rules(
            (
                f"self.all(k, k.matches('{LABEL_KEY}') && k.{_PREFIX_LENGTH})",
                f"{field} keys must be Kubernetes label keys: " + _LABEL_KEY_MESSAGE,
            ),
            (
                f"self.all(k, self[k].matches('{LABEL_VALUE}'))",
                f"{field} values must be Kubernetes label values: empty or " + _LABEL_CHARS,
            ),
        ),
        description=description,
    )


class ModelSpec(ApiModel):
    """The pretrained MusicGen model to fine-tune."""

    base: str = Field(
        default="facebook/musicgen-small",
        min_length=1,
        description=(
            "Hugging Face id (facebook/musicgen-small, -medium, -large, -melody), or a local "
            "path or s3:// URI of a folder in audiocraft's release format (state_dict.bin + "
            "compression_state_dict.bin: e.g. another run's status.artifacts export) or of a "
            "mirror staged by `fermata-train stage-models` (loaded without the Hub). The first "
            "pod mirrors it into <storage.checkpoints>/model/ for the run's later pods."
        ),
    )


class DatasetSource(str, Enum):
    magnatagatune = "magnatagatune"
    manifest = "manifest"
    #: a local path or s3:// prefix holding audio files, described from their tags and audio
    folder = "folder"


DEFAULT_PROXY_TAGS = [
    "drums",
    "percussion",
    "beats",
    "electronic",
    "dance",
    "piano",
    "jazzy",
    "bass",
    "deep",
    "chill",
    "mellow",
    "soulful",
]


class BpmBand(ApiModel):
    """A tempo band in beats per minute; either edge may be left open."""

    model_config = cel(
        (
            "!has(self.min) || !has(self.max) || self.min <= self.max",
            "bpm.min must not exceed bpm.max",
        ),
    )

    min: float | None = Field(default=None, gt=0, le=400, description="Lowest tempo kept (BPM).")
    max: float | None = Field(default=None, gt=0, le=400, description="Highest tempo kept (BPM).")

    @model_validator(mode="after")
    def _min_not_above_max(self) -> BpmBand:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"bpm.min must not exceed bpm.max (min={self.min}, max={self.max})")
        return self


class KeyMode(str, Enum):
    major = "major"
    minor = "minor"


class SilenceAction(str, Enum):
    off = "off"
    reject = "reject"
    trim = "trim"


class SilenceSpec(ApiModel):
    """What to do with silence: nothing, reject mostly-silent clips, or trim it at both ends."""

    action: SilenceAction = Field(
        default=SilenceAction.off,
        description=(
            "off: keep clips as they are; reject: skip a clip whose silent share (50 ms windows "
            "under thresholdDb) exceeds maxSilentFraction (reason 'mostly silent'); trim: cut "
            "the silence at the start and the end of each clip before tokenizing."
        ),
    )
    threshold_db: float = Field(
        default=-50.0,
        ge=-120,
        le=0,
        description="A 50 ms window whose RMS level is below this (dBFS) counts as silent.",
    )
    max_silent_fraction: float = Field(
        default=0.5,
        gt=0,
        le=1,
        description="action=reject: the largest share of silent windows a kept clip may have.",
    )


class LoudnessSpec(ApiModel):
    """Loudness normalisation of each clip before tokenizing (ITU-R BS.1770 integrated loudness)."""

    target_lufs: float = Field(
        ge=-70, le=-5, description="Integrated loudness each clip is brought to, e.g. -14 (LUFS)."
    )
    peak_ceiling_dbfs: float = Field(
        default=-1.0,
        ge=-20,
        le=0,
        description=(
            "Sample peak ceiling: a clip the gain would push above it is limited to it, so "
            "normalisation never clips (a loud target can then be missed by the limited share)."
        ),
    )


class CurationSpec(ApiModel):
    """Which checked clips are kept and how their audio is conditioned; every filter is off by default
    except duplicate removal."""

    model_config = cel(
        (
            "!has(self.minDurationSeconds) || !has(self.maxDurationSeconds) || "
            "self.minDurationSeconds <= self.maxDurationSeconds",
            "curation.minDurationSeconds must not exceed curation.maxDurationSeconds",
            ".minDurationSeconds",
        ),
    )

    min_duration_seconds: float | None = Field(
        default=None, gt=0, le=86400, description="Skip clips shorter than this (reason 'too short')."
    )
    max_duration_seconds: float | None = Field(
        default=None, gt=0, le=86400, description="Skip clips longer than this (reason 'too long')."
    )
    min_sample_rate: int | None = Field(
        default=None,
        ge=1000,
        le=768000,
        description="Skip files recorded below this sample rate in Hz (reason 'low sample rate').",
    )
    min_bitrate_kbps: float | None = Field(
        default=None,
        gt=0,
        le=100000,
        description=(
            "Skip lossy files (MP3, AAC, Ogg, Opus) whose bitrate is below this, e.g. 320 (reason "
            "'low bitrate'). Lossless files (WAV/AIFF PCM, FLAC, ALAC) always pass this floor."
        ),
    )
    bpm: BpmBand | None = Field(
        default=None,
        description=(
            "Keep clips whose tempo lies in this band (reason 'bpm out of band'): the manifest "
            "entry's bpm, else estimated from the audio (a decode per clip, only when set)."
        ),
    )
    keys: list[
        Annotated[
            str,
            Field(
                max_length=16,
                pattern="^[A-G][#b]? (major|minor)$",
                json_schema_extra=pattern_rule(
                    "curation.keys entries must be keys such as 'A minor' or 'F# major'"
                ),
            ),
        ]
    ] = Field(
        default_factory=list,
        max_length=24,
        description=(
            "Keep only clips in one of these keys (enharmonics match: A# minor = Bb minor; reason "
            "'key not allowed'); the manifest entry's key, else estimated from the audio."
        ),
    )
    mode: KeyMode | None = Field(
        default=None,
        description="Keep only clips in this mode, major or minor (reason 'key not allowed').",
    )
    silence: SilenceSpec = Field(
        default_factory=SilenceSpec, description="Silence rejection or trimming (off by default)."
    )
    loudness: LoudnessSpec | None = Field(
        default=None, description="Optional loudness normalisation before tokenizing (off by default)."
    )
    dedupe: bool = Field(
        default=True,
        description=(
            "Skip a file whose audio bytes (sha256) equal an earlier kept file's (reason 'duplicate audio')."
        ),
    )

    @model_validator(mode="after")
    def _durations_ordered(self) -> CurationSpec:
        low, high = self.min_duration_seconds, self.max_duration_seconds
        if low is not None and high is not None and low > high:
            raise ValueError(
                "curation.minDurationSeconds must not exceed curation.maxDurationSeconds "
                f"(min={low}, max={high})"
            )
        return self


class MixSpec(ApiModel):
    """Balance one manifest by a field of its entries (tier, sub-genre)."""

    by: str = Field(
        min_length=1,
        max_length=63,
        pattern="^[A-Za-z_][A-Za-z0-9_]*$",
        description="The manifest field whose values form the groups, e.g. tier or subgenre.",
    )
    weights: dict[str, Annotated[float, Field(gt=0, le=1000)]] = Field(
        min_length=1,
        max_length=32,
        description=(
            "Relative share of each group in the kept audio (seconds), e.g. {gold: 60, silver: 30, "
            "bronze: 10}; entries of other groups are skipped (reason 'not in mix')."
        ),
    )


class SourceSpec(ApiModel):
    """One of several sources of a dataset, with its share of the mix."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern="^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Source name (unique in the dataset): the group its clips belong to.",
    )
    source: DatasetSource = Field(default=DatasetSource.magnatagatune, description="As dataset.source.")
    uri: str = Field(min_length=1, max_length=2048, description="As dataset.uri.")
    proxy_tags: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROXY_TAGS),
        max_length=188,
        description="As dataset.proxyTags (source=magnatagatune).",
    )
    min_tags: int = Field(default=3, ge=1, le=188, description="As dataset.minTags (source=magnatagatune).")
    genre: str | None = Field(default=None, max_length=100, description="As dataset.genre (source=folder).")
    weight: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description=(
            "Relative share of this source in the kept audio (seconds); give every source a weight "
            "or none (none: all clips of every source are kept)."
        ),
    )


class DatasetSpec(ApiModel):
    """Where the training audio comes from and how it is filtered."""

    model_config = cel(
        (
            "(has(self.uri) && size(self.uri) > 0) != has(self.sources)",
            "set dataset.uri (one source) or dataset.sources (several), not both",
        ),
        (
            "!has(self.sources) || self.sources.all(s, has(s.weight)) || self.sources.all(s, !has(s.weight))",
            "give every dataset.sources entry a weight, or none",
            ".sources",
        ),
        (
            "!has(self.mix) || (!has(self.sources) && self.source == 'manifest')",
            "dataset.mix balances one manifest by an entry field; with dataset.sources, give each "
            "source a weight instead",
            ".mix",
        ),
    )

    source: DatasetSource = Field(
        default=DatasetSource.magnatagatune,
        description=(
            "magnatagatune: a MagnaTagATune tree (annotations_final.csv + mp3/) filtered by "
            "proxyTags; manifest: a JSONL file of {audio, description[, bpm, key, tags]}; folder: "
            "a local path or s3:// prefix holding audio files (MP3, WAV, FLAC, OGG, M4A, any depth), "
            "described from their embedded tags and estimated BPM and key."
        ),
    )
    uri: str = Field(
        default="",
        max_length=2048,
        description=(
            "Local path or s3:// URI: the MagnaTagATune root (source=magnatagatune), the "
            "manifest JSONL file (source=manifest) or the folder of audio files (source=folder). "
            "Leave empty when sources is set."
        ),
    )
    genre: str | None = Field(
        default=None,
        max_length=100,
        description=(
            "The collection's genre (source=folder), named in the descriptions of files whose "
            "genre tag is empty, e.g. amapiano."
        ),
    )
    sources: list[SourceSpec] | None = Field(
        default=None,
        min_length=1,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description=(
            "Several sources instead of source/uri, each with an optional weight: the kept audio "
            "is balanced to the weights (see curation in docs/data-preparation.md)."
        ),
    )
    mix: MixSpec | None = Field(
        default=None,
        description=(
            "Balance a manifest by an entry field (e.g. tier: {gold: 60, silver: 30, bronze: 10}); "
            "over-represented groups are down-sampled (reason 'mix balance')."
        ),
    )
    curation: CurationSpec = Field(
        default_factory=CurationSpec,
        description="Quality filters, duplicate removal, silence and loudness handling.",
    )
    proxy_tags: list[str] = Field(
        default_factory=lambda: list(DEFAULT_PROXY_TAGS),
        max_length=188,
        description="MagnaTagATune tags that stand in for the target genre's traits.",
    )
    min_tags: int = Field(
        default=3,
        ge=1,
        le=188,
        description="Keep a clip only if it carries at least this many of proxyTags.",
    )
    validation_fraction: float = Field(
        default=0.1,
        gt=0,
        lt=1,
        description="Share of clips held out for validation (deterministic split by clip id).",
    )
    segment_seconds: float = Field(
        default=10.0,
        gt=0,
        le=60,
        description=(
            "Length of the training segments in seconds; clips shorter than a segment are padded and "
            "masked; the tail of a longer clip is kept (padded) when at least half a segment, else dropped."
        ),
    )
    verify_checksums: bool = Field(
        default=True,
        description="Verify each audio file against its recorded sha256 before tokenizing.",
    )

    @model_validator(mode="after")
    def _one_way_to_name_the_audio(self) -> DatasetSpec:
        if bool(self.uri) == (self.sources is not None):
            raise ValueError("set dataset.uri (one source) or dataset.sources (several), not both")
        if self.sources is not None:
            names = [s.name for s in self.sources]
            if len(set(names)) != len(names):
                raise ValueError(f"dataset.sources names must be unique: {names}")
            if len({s.weight is None for s in self.sources}) > 1:
                raise ValueError("give every dataset.sources entry a weight, or none")
        if self.mix is not None and (self.sources is not None or self.source is not DatasetSource.manifest):
            raise ValueError(
                "dataset.mix balances one manifest by an entry field; with dataset.sources, give "
                "each source a weight instead"
            )
        return self


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class TrainingSpec(ApiModel):
    """Optimisation hyper-parameters. Defaults follow audiocraft's MusicGen recipe."""

    epochs: int = Field(default=20, ge=1, le=10000, description="Passes over the train split.")
    max_steps: int | None = Field(
        default=None,
        ge=1,
        description="Optional cap on optimizer steps (overrides epochs when smaller).",
    )
    batch_size: int = Field(default=8, ge=1, le=4096, description="Clips per optimizer micro-batch.")
    gradient_accumulation: int = Field(
        default=1, ge=1, le=1024, description="Micro-batches accumulated per optimizer step."
    )
    learning_rate: float = Field(default=5.0e-5, gt=0, le=1, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=0.1, ge=0, le=1, description="AdamW weight decay.")
    warmup_steps: int = Field(default=100, ge=0, description="Linear warm-up steps before cosine decay.")
    gradient_clip: float = Field(default=1.0, gt=0, description="Max gradient norm.")
    cfg_dropout: float = Field(
        default=0.3,
        ge=0,
        le=1,
        description="Classifier-free-guidance dropout: share of samples trained unconditioned.",
    )
    checkpoint_every_steps: int = Field(
        default=1000, ge=1, description="Write a checkpoint every this many optimizer steps."
    )
    evaluate_every_steps: int = Field(
        default=500,
        ge=1,
        description="Validation loss and authenticity every this many optimizer steps.",
    )
    seed: int = Field(default=1234, ge=0, description="Seed for data order, dropout and sampling.")
    prompt_augmentation: bool = Field(
        default=True,
        description=(
            "Vary each training clip's text prompt per epoch (a template and which of its BPM, key "
            "and tags to name, picked by a hash of seed, epoch and clip id; the first epoch uses "
            "the description as is). Validation and evaluation always use the description."
        ),
    )
    precision: Precision = Field(
        default=Precision.auto,
        description=(
            "Autocast over float32 weights. auto: bf16 on CUDA compute capability >= 8.0 (A10G, "
            "L4, A100, H100), fp16 with a gradient scaler below it (T4, V100), float32 on CPU. "
            "fp16: fp16 with a gradient scaler anywhere. bf16: CPU or CUDA >= 8.0 only (an "
            "older GPU fails the run as a configuration error). fp32: no autocast."
        ),
    )


class BestMetric(str, Enum):
    validation_loss = "validationLoss"
    authenticity = "authenticity"


class EvaluationSpec(ApiModel):
    """How each evaluation generates and scores clips (the authenticity metric)."""

    prompts: list[str] = Field(
        default_factory=lambda: [
            "mellow amapiano with log drums and piano",
            "deep soulful amapiano with log drums and bass",
        ],
        min_length=1,
        max_length=32,
        description="Genre prompts generated at each evaluation.",
    )
    clip_seconds: float = Field(default=8.0, gt=0, le=30, description="Length of each generated clip.")
    bpm_min: float = Field(default=105.0, gt=0, le=300, description="Lower edge of the genre's tempo band.")
    bpm_max: float = Field(default=118.0, gt=0, le=300, description="Upper edge of the genre's tempo band.")
    reference_uri: str | None = Field(
        default=None,
        description=(
            "Optional local path or s3:// URI of reference clips (a folder of audio files); "
            "defaults to the training subset."
        ),
    )
    best_metric: BestMetric = Field(
        default=BestMetric.validation_loss,
        description=(
            "What makes an evaluation the best so far, whose weights the trainer exports "
            "(status.artifacts.best, in audiocraft's release format): validationLoss (lower is "
            "better) or authenticity (higher is better; an evaluation without an authenticity "
            "score never becomes the best). The final weights are exported too "
            "(status.artifacts.final)."
        ),
    )


class StorageSpec(ApiModel):
    """Where checkpoints, token caches and evaluation clips are kept."""

    checkpoints: str = Field(
        min_length=1,
        description="s3:// URI prefix (or local path) for checkpoints, samples and reports.",
    )
    credentials_secret: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        json_schema_extra=pattern_rule(
            "storage.credentialsSecret must be a Secret name (a DNS-1123 subdomain: lowercase "
            "letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ),
        description=(
            "Secret in the run's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(and optional AWS_ENDPOINT_URL_S3, AWS_REGION); omit to use the pod's IAM role."
        ),
    )
    keep_last: int = Field(
        default=3,
        ge=1,
        le=1000,
        description="Checkpoints kept; older ones are pruned. The newest verified one is never deleted.",
    )
    cache_uri: str | None = Field(
        default=None,
        description="Where tokenized code shards are mirrored (defaults to <checkpoints>/cache/).",
    )


class CapacityType(str, Enum):
    spot = "spot"
    on_demand = "on-demand"


class Toleration(ApiModel):
    """A toleration added to the trainer pod (on top of the operator's GPU/spot defaults)."""

    key: str | None = Field(
        default=None,
        max_length=317,
        pattern=f"^({LABEL_KEY.strip('^$')})?$",
        json_schema_extra=pattern_rule(
            "resources.tolerations[].key must be empty or a Kubernetes label key: " + _LABEL_KEY_MESSAGE,
            (
                f"self.{_PREFIX_LENGTH}",
                "resources.tolerations[].key: the prefix before '/' is at most 253 characters",
            ),
        ),
        description="Taint key (empty with Exists: all taints).",
    )
    operator: str = Field(default="Equal", pattern="^(Equal|Exists)$", description="Equal or Exists.")
    value: str | None = Field(
        default=None,
        max_length=63,
        pattern=LABEL_VALUE,
        json_schema_extra=pattern_rule(
            "resources.tolerations[].value must be a Kubernetes label value: empty or " + _LABEL_CHARS
        ),
        description="Taint value for operator Equal.",
    )
    effect: str | None = Field(
        default=None,
        pattern="^(NoSchedule|PreferNoSchedule|NoExecute)$",
        description="Taint effect to tolerate (empty: all).",
    )


class ResourcesSpec(ApiModel):
    """Where and on what the trainer pod runs."""

    image: str = Field(
        min_length=1,
        max_length=512,
        pattern=IMAGE_REFERENCE,
        json_schema_extra=pattern_rule(
            "resources.image must be an image reference such as ghcr.io/org/fermata-trainer:0.1.0 "
            "or registry/repository@sha256:<digest> (no spaces, lowercase repository path)"
        ),
        description="Trainer container image (see the Dockerfile's trainer target).",
    )
    image_pull_policy: str = Field(
        default="IfNotPresent",
        pattern="^(Always|IfNotPresent|Never)$",
        description="Image pull policy of the trainer container.",
    )
    gpus: int = Field(default=1, ge=0, le=8, description="nvidia.com/gpu per pod; >1 runs torchrun DDP.")
    cpu: str = _quantity_field(
        "resources.cpu", "2", "2, 500m or 1.5", "CPU request of the trainer container."
    )
    memory: str = _quantity_field(
        "resources.memory", "8Gi", "8Gi or 16000Mi", "Memory request and limit of the trainer container."
    )
    instance_types: list[
        Annotated[
            str,
            Field(
                max_length=63,
                pattern=INSTANCE_TYPE,
                json_schema_extra=pattern_rule(
                    "resources.instanceTypes entries must be instance type names such as "
                    "g4dn.xlarge: lowercase letters, digits, '.' and '-', starting and ending with "
                    "a letter or digit"
                ),
            ),
        ]
    ] = Field(
        default_factory=lambda: ["g4dn.xlarge"],
        min_length=1,
        max_length=32,
        description="Allowed node.kubernetes.io/instance-type values; priced by the price table.",
    )
    capacity: CapacityType = Field(
        default=CapacityType.spot,
        description="spot (falls back to on-demand per spec.spot) or on-demand.",
    )
    node_selector: NodeSelector = _node_selector_field(
        "resources.nodeSelector", "Extra node labels the trainer pod requires."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Extra tolerations for the trainer pod."
    )
    priority_class_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        json_schema_extra=pattern_rule(
            "resources.priorityClassName must be a PriorityClass name (a DNS-1123 subdomain: "
            "lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
        ),
        description="PriorityClass of the trainer pod.",
    )
    termination_grace_period_seconds: int = Field(
        default=150,
        ge=30,
        le=3600,
        description=(
            "Time the trainer gets to write its checkpoint after SIGTERM (a spot notice gives ~120 s)."
        ),
    )
    scratch_size: str = _quantity_field(
        "resources.scratchSize",
        "50Gi",
        "50Gi or 100G",
        "Size limit of the pod's scratch volume (code cache, downloads).",
    )


class PriceOverride(ApiModel):
    """An hourly price that replaces the price table's for this run."""

    instance_type: str = Field(min_length=1, description="node.kubernetes.io/instance-type.")
    capacity_type: CapacityType = Field(description="spot or on-demand.")
    hourly_usd: float = Field(ge=0, le=10000, description="US dollars per node-hour.")


class BudgetSpec(ApiModel):
    """The dollar budget the run must stay inside."""

    max_usd: float = Field(gt=0, le=10_000_000, description="Hard budget in US dollars.")
    warn_at_fraction: float = Field(
        default=0.8,
        gt=0,
        lt=1,
        description="Raise the BudgetWarning condition and an Event at this share of maxUSD.",
    )
    stop_on_projected_overrun: bool = Field(
        default=False,
        description=("Stop early when the projected total at the current progress rate exceeds maxUSD."),
    )
    prices: list[PriceOverride] = Field(
        default_factory=list,
        max_length=64,
        description="Per-run overrides of the operator's price table.",
    )


class IdleSpec(ApiModel):
    """When a running trainer counts as idle and is stopped (after a checkpoint)."""

    timeout: Duration = Field(
        default="2h",
        description=(
            "Stop after the heartbeat is stale, the step has not advanced, or GPU utilisation "
            "stayed under minGpuUtilization, for this long."
        ),
    )
    min_gpu_utilization: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="GPU utilisation (0-1) under which the GPU counts idle.",
    )
    preparation_timeout: Duration = Field(
        default="12h",
        description=(
            "While the trainer reports Preparing or Tokenizing (scanning, decoding and "
            "tokenizing the dataset, loading the model), its step does not advance and the GPU "
            "is unused by design: only a heartbeat stale for `timeout`, or preparation lasting "
            "longer than this, counts as idle. With spec.preparation.mode Pod the same holds for "
            "the preparation pods, the allowance counted from the first one's start."
        ),
    )


class SpotSpec(ApiModel):
    """Spot interruption handling: a separate retry budget from application failures."""

    model_config = cel(
        (
            "self.fallbackToOnDemandAfter <= self.maxInterruptions",
            "fallbackToOnDemandAfter must not exceed maxInterruptions",
            ".fallbackToOnDemandAfter",
        ),
    )

    max_interruptions: int = Field(
        default=10, ge=0, le=1000, description="Spot interruptions survived before the run fails."
    )
    fallback_to_on_demand_after: int = Field(
        default=3,
        ge=0,
        le=1000,
        description="Move to on-demand capacity after this many interruptions (0: never).",
    )
    backoff_seconds: int = Field(
        default=10, ge=0, le=3600, description="First delay before recreating an interrupted pod."
    )
    max_backoff_seconds: int = Field(
        default=600, ge=0, le=86400, description="Cap of the exponential recreate delay."
    )


class FailureSpec(ApiModel):
    """Application failures (non-zero exits, OOM): retried apart from spot interruptions."""

    max_retries: int = Field(
        default=1, ge=0, le=100, description="Pod failures retried before the run is Failed."
    )
    backoff_seconds: int = Field(default=30, ge=0, le=3600, description="First retry delay.")


class GateAt(ApiModel):
    """When a gate fires: exactly one of elapsed, step, epoch."""

    model_config = cel(
        (
            "[has(self.elapsed), has(self.step), has(self.epoch)].filter(x, x).size() == 1",
            "set exactly one of elapsed, step or epoch",
        ),
    )

    elapsed: Duration | None = Field(
        default=None, description="Wall-clock time since the run started, e.g. 35d."
    )
    step: int | None = Field(default=None, ge=0, description="Optimizer step reached.")
    epoch: int | None = Field(default=None, ge=0, description="Epoch reached.")


class GateRequire(ApiModel):
    """Thresholds a gate checks; at least one."""

    model_config = cel(
        (
            "has(self.minAuthenticity) || has(self.maxValidationLoss) || has(self.maxCostUSD) "
            "|| has(self.minImprovementOverBaseline)",
            "a gate needs at least one of minAuthenticity, maxValidationLoss, maxCostUSD, "
            "minImprovementOverBaseline",
        ),
    )

    min_authenticity: float | None = Field(
        default=None, ge=0, le=1, description="Lowest acceptable authenticity score (0-1)."
    )
    max_validation_loss: float | None = Field(
        default=None, gt=0, le=100, description="Highest acceptable validation cross-entropy."
    )
    max_cost_usd: float | None = Field(
        default=None, gt=0, description="Highest acceptable accrued cost in US dollars."
    )
    min_improvement_over_baseline: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description=(
            "Relative to the run's own baseline: the validation loss must be at least this share "
            "below the pretrained model's (progress.baselineValidationLoss, measured at step 0); "
            "0.05 means at least 5% lower."
        ),
    )


class PlateauSpec(ApiModel):
    """Early stopping: stop a run whose validation loss no longer improves."""

    evaluations: int = Field(
        ge=1,
        le=1000,
        description=("Stop after this many consecutive evaluations without a new best validation loss."),
    )
    min_improvement: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description=(
            "Relative improvement over the best loss so far that counts as better (0.01: 1% lower)."
        ),
    )


class NoGoAction(str, Enum):
    stop = "stop"
    continue_ = "continue"


class GateSpec(ApiModel):
    """A go/no-go milestone."""

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description="Gate name (unique in the run).",
    )
    at: GateAt = Field(description="When the gate is evaluated.")
    require: GateRequire = Field(description="Thresholds for GO.")
    margin: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description=(
            "Relative margin: a metric that misses its threshold by at most this share gives "
            "CONDITIONAL-GO (continue, flagged) instead of NO-GO."
        ),
    )
    on_no_go: NoGoAction = Field(
        default=NoGoAction.stop,
        description="stop: checkpoint and stop the run on NO-GO; continue: record only.",
    )


class CleanupSpec(ApiModel):
    """What goes once ``ttlSecondsAfterFinished`` has passed after the run finished."""

    delete_run: bool = Field(
        default=False,
        description=(
            "Also delete the TrainingRun itself (with its status, cost history and Events). "
            "false: only the run's pods, ConfigMap, ServiceAccount, Role and RoleBinding go; the "
            "TrainingRun and its status stay. Checkpoints and artifacts in storage are never deleted."
        ),
    )


class PreparationMode(str, Enum):
    pod = "Pod"
    trainer = "Trainer"


#: CPU instance types a preparation pod may use by default (all in the built-in price table).
DEFAULT_PREPARATION_INSTANCE_TYPES = ["m5.xlarge", "m5.2xlarge", "m6i.xlarge", "m6i.2xlarge", "c5.2xlarge"]


class PreparationResources(ApiModel):
    """Where and on what the preparation pod runs (CPU capacity: no GPU is requested)."""

    cpu: str = _quantity_field(
        "preparation.resources.cpu", "4", "4, 500m or 1.5", "CPU request of the preparation container."
    )
    memory: str = _quantity_field(
        "preparation.resources.memory",
        "16Gi",
        "16Gi or 16000Mi",
        "Memory request and limit of the preparation container.",
    )
    instance_types: list[
        Annotated[
            str,
            Field(
                max_length=63,
                pattern=INSTANCE_TYPE,
                json_schema_extra=pattern_rule(
                    "preparation.resources.instanceTypes entries must be instance type names such "
                    "as m5.xlarge: lowercase letters, digits, '.' and '-', starting and ending with "
                    "a letter or digit"
                ),
            ),
        ]
    ] = Field(
        default_factory=lambda: list(DEFAULT_PREPARATION_INSTANCE_TYPES),
        min_length=1,
        max_length=32,
        description=(
            "Allowed node.kubernetes.io/instance-type values of the preparation pod; each must be "
            "priced (spec.budget.prices or the price table), or no preparation pod starts."
        ),
    )
    capacity: CapacityType = Field(
        default=CapacityType.on_demand,
        description=(
            "spot or on-demand for the preparation pod (an interrupted one is re-created and "
            "resumes where the code cache left off)."
        ),
    )
    node_selector: NodeSelector = _node_selector_field(
        "preparation.resources.nodeSelector", "Extra node labels the preparation pod requires."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Extra tolerations for the preparation pod."
    )
    scratch_size: str = _quantity_field(
        "preparation.resources.scratchSize",
        "50Gi",
        "50Gi or 100G",
        "Size limit of the preparation pod's scratch volume (downloads, code shards).",
    )


class PreparationSpec(ApiModel):
    """Where the dataset is scanned, verified, decoded and tokenized before training."""

    mode: PreparationMode = Field(
        default=PreparationMode.pod,
        description=(
            "Pod: a preparation pod on CPU capacity (preparation.resources) builds the dataset "
            "manifest and the code cache first, and the GPU pod starts only once that prepared "
            "dataset is verified (it then only loads it). Trainer: the GPU pod tokenizes itself "
            "before training."
        ),
    )
    resources: PreparationResources = Field(
        default_factory=PreparationResources,
        description="CPU, memory and placement of the preparation pod (mode Pod).",
    )


class TrainingRunSpec(ApiModel):
    """Desired state of a MusicGen fine-tuning run."""

    model_config = cel(
        (
            "!has(self.gates) || self.gates.all(g, !has(g.require.maxCostUSD) || "
            "g.require.maxCostUSD <= self.budget.maxUSD)",
            "a gate's maxCostUSD cannot exceed budget.maxUSD",
            ".gates",
        ),
        (
            "self.evaluation.bpmMin < self.evaluation.bpmMax",
            "evaluation.bpmMin must be below evaluation.bpmMax",
            ".evaluation",
        ),
        (
            "self.storage.checkpoints == oldSelf.storage.checkpoints",
            "storage.checkpoints is immutable: the run's checkpoints live there",
            ".storage.checkpoints",
        ),
        (
            "self.model.base == oldSelf.model.base",
            "model.base is immutable: start a new run to change the base model",
            ".model.base",
        ),
        (
            "has(self.resumeFrom) == has(oldSelf.resumeFrom) && "
            "(!has(self.resumeFrom) || self.resumeFrom == oldSelf.resumeFrom)",
            "resumeFrom is immutable: start a new run to start from another checkpoint",
            ".resumeFrom",
        ),
        (
            "self.dataset == oldSelf.dataset",
            "dataset is immutable: the run's checkpoints and token cache belong to this data; "
            "start a new run (optionally with resumeFrom) to train on other data",
            ".dataset",
        ),
        (
            "!has(self.cleanup) || !has(self.cleanup.deleteRun) || !self.cleanup.deleteRun || "
            "has(self.ttlSecondsAfterFinished)",
            "cleanup.deleteRun needs ttlSecondsAfterFinished (when to delete the run)",
            ".cleanup",
        ),
    )

    model: ModelSpec = Field(default_factory=ModelSpec, description="Base model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training audio and how it is selected.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Optimisation settings.")
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Validation and authenticity scoring."
    )
    resources: ResourcesSpec = Field(description="Trainer image, GPUs and node placement.")
    budget: BudgetSpec = Field(description="Dollar budget and warning level.")
    idle: IdleSpec = Field(default_factory=IdleSpec, description="Idle shutdown policy.")
    spot: SpotSpec = Field(default_factory=SpotSpec, description="Spot interruption policy.")
    failures: FailureSpec = Field(
        default_factory=FailureSpec, description="Application failure retry policy."
    )
    gates: list[GateSpec] = Field(
        default_factory=list,
        max_length=16,
        description="Go/no-go milestones.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    plateau: PlateauSpec | None = Field(
        default=None,
        description=(
            "Optional early stopping: checkpoint and stop (phase Stopped, reason Plateau) when "
            "validation loss stops improving; the decision is every gate's thresholds applied to "
            "the final metrics, as at completion."
        ),
    )
    storage: StorageSpec = Field(description="Checkpoint storage and credentials.")
    resume_from: str | None = Field(
        default=None,
        max_length=2048,
        pattern=RESUME_FROM_PATTERN,
        json_schema_extra=pattern_rule(
            "resumeFrom must be the URI of a checkpoint manifest: "
            "<storage.checkpoints of that run>/checkpoints/step-<9 digits>/manifest.json"
        ),
        description=(
            "Optional: the manifest URI (…/checkpoints/step-…/manifest.json) of another run's "
            "checkpoint to start from; the run's own checkpoints always take precedence once it "
            "has one."
        ),
    )
    suspend: bool = Field(
        default=False,
        description="true: checkpoint, release the GPU and wait; false again resumes.",
    )
    deadline: Duration | None = Field(
        default=None, description="Optional wall-clock limit for the whole run (e.g. 40d)."
    )
    service_account: ServiceAccountSpec | None = Field(
        default=None,
        description=(
            "The trainer pod's cloud identity: annotations for the per-run ServiceAccount (IRSA, "
            "GKE), or the name of an existing ServiceAccount of the namespace to run as."
        ),
    )
    pod: PodOverrides | None = Field(
        default=None,
        description=(
            "Additions to the trainer pod: labels, annotations, env, volumes, imagePullSecrets, "
            "node affinity and topology spread; never replacing what the operator sets."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=315_360_000,
        description=(
            "Optional: this many seconds after the run finished (Succeeded, Failed, Stopped, "
            "BudgetExceeded, IdleStopped; status.completionTime), its pods, ConfigMap and the "
            "ServiceAccount, Role and RoleBinding the operator created for it are deleted; the "
            "TrainingRun, its status (cost history, decision, artifacts) and the checkpoints stay "
            "(see cleanup.deleteRun). Recorded in status.cleanedUp and the CleanedUp condition."
        ),
    )
    cleanup: CleanupSpec | None = Field(
        default=None, description="What ttlSecondsAfterFinished removes besides the run's objects."
    )
    preparation: PreparationSpec = Field(
        default_factory=PreparationSpec,
        description=(
            "Where the dataset is prepared (manifest, decoding, tokenizing): a separate pod on CPU "
            "capacity before the GPU pod (mode Pod, the default), or the GPU pod itself (mode Trainer)."
        ),
    )
