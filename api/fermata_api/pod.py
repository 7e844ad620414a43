"""``spec.serviceAccount`` and ``spec.pod``: the trainer pod's cloud identity and overrides.

Only fields that keep the pod at the `restricted` Pod Security level exist here (no hostPath,
no privileges, no capabilities), no reference names a namespace (ConfigMaps, Secrets and
claims are the run's namespace's), and CEL rules refuse at admission whatever would replace
what the operator controls: the ``fermata.dev`` label and annotation domain, ``FERMATA_*``
and the trainer's own environment, the reserved volumes and their mount paths, and the node
labels of the operator's spot/instance-type placement.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field
from pydantic.config import JsonDict

from fermata_api.base import ApiModel, cel, field_rules, pattern_rule

_DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = f"^{_DNS_LABEL}([.]{_DNS_LABEL})*$"
_DNS_LABEL_ONLY = f"^{_DNS_LABEL}$"
_LABEL_NAME = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = f"^({_DNS_LABEL}([.]{_DNS_LABEL})*/)?{_LABEL_NAME}$"
_LABEL_VALUE = f"^({_LABEL_NAME})?$"
#: An environment variable name (letters, digits, '_', '-', '.'; not starting with a digit).
_ENV_NAME = "^[-._a-zA-Z][-._a-zA-Z0-9]*$"
#: An absolute path without empty segments or a trailing '/'.
_ABS_PATH = "^(/[^/]+)+$"
#: A relative path (a key's file in a volume, a subPath).
_REL_PATH = "^[^/]+(/[^/]+)*$"

#: Environment variables the operator sets on the trainer, besides every ``FERMATA_*`` name.
RESERVED_ENV = ("HF_HOME", "HOME", "PYTHONUNBUFFERED")
#: Volumes of the operator's own (the trainer config, scratch, /dev/shm).
RESERVED_VOLUMES = ("config", "scratch", "dshm")
#: Mount paths the operator's volumes use; nothing is mounted on, above or under the first two.
RESERVED_MOUNT_DIRS = ("/etc/fermata", "/tmp/fermata")
RESERVED_MOUNT_PATHS = ("/", "/etc", "/tmp", "/dev", "/dev/shm")
#: Label keys the operator sets besides its own ``fermata.dev`` domain.
RESERVED_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/component", "app.kubernetes.io/managed-by")
#: Node labels of the operator's placement (spec.resources.capacity and instanceTypes decide them).
RESERVED_NODE_LABELS = (
    "karpenter.sh/capacity-type",
    "eks.amazonaws.com/capacityType",
    "node.kubernetes.io/instance-type",
)

_NAME_MSG = (
    "a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit"
)
_FERMATA_DOMAIN = (
    "k == 'fermata.dev' || k.startsWith('fermata.dev/') || k.split('/')[0].endsWith('.fermata.dev')"
)


def _cel_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _name_field(what: str) -> Any:
    return Field(
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        json_schema_extra=pattern_rule(f"{what} must be a {_NAME_MSG}"),
        description=f"Name, in the run's namespace ({what}).",
    )


def _metadata_map(what: str, reserved: tuple[str, ...], values: bool) -> JsonDict:
    rules = [
        (
            "self.all(k, k.size() <= 316 && k.matches('" + _LABEL_KEY + "'))",
            f"pod.{what} keys must be Kubernetes label keys: an optional DNS subdomain prefix and '/', "
            "then a name of at most 63 letters, digits, '-', '_' or '.'",
        ),
        (
            f"!self.exists(k, {_FERMATA_DOMAIN} || k in {_cel_list(reserved)})",
            f"pod.{what} may not use the fermata.dev domain or the operator's own keys "
            + ", ".join(reserved),
        ),
    ]
    if values:
        rules.append(
            (
                "self.all(k, self[k].matches('" + _LABEL_VALUE + "'))",
                "pod.labels values must be Kubernetes label values: empty or at most 63 letters, "
                "digits, '-', '_' or '.', starting and ending with a letter or digit",
            )
        )
    return field_rules(*rules)


# ----------------------------------------------------------------------------- service account


class ServiceAccountSpec(ApiModel):
    """The trainer pod's identity: annotations on its own ServiceAccount, or an existing one."""

    model_config = cel(
        (
            "!(has(self.name) && has(self.annotations))",
            "set either serviceAccount.name (an existing ServiceAccount) or serviceAccount.annotations "
            "(for the ServiceAccount the operator creates), not both",
        ),
    )

    name: str | None = Field(
        default=None,
        max_length=253,
        pattern=_DNS_SUBDOMAIN,
        json_schema_extra=pattern_rule(f"serviceAccount.name must be a ServiceAccount name: {_NAME_MSG}"),
        description=(
            "An existing ServiceAccount in the run's namespace the trainer runs as (EKS Pod "
            "Identity, GKE Workload Identity) instead of the namespace's fermata-trainer; the "
            "operator binds the namespace's fermata-trainer status Role to it (RoleBinding "
            "<run>-trainer) and never changes the ServiceAccount itself."
        ),
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=32,
        json_schema_extra=field_rules(
            (
                "self.all(k, k.size() <= 316 && k.matches('" + _LABEL_KEY + "'))",
                "serviceAccount.annotations keys must be Kubernetes annotation keys",
            ),
            (
                f"!self.exists(k, {_FERMATA_DOMAIN})",
                "serviceAccount.annotations may not use the fermata.dev domain",
            ),
        ),
        description=(
            "Annotations of a ServiceAccount of the run's own (<run>-trainer) the operator "
            "creates instead of using the namespace's fermata-trainer, e.g. "
            "eks.amazonaws.com/role-arn (IRSA) or iam.gke.io/gcp-service-account."
        ),
    )


# ----------------------------------------------------------------------------- env


class KeyRef(ApiModel):
    """One key of a ConfigMap or Secret in the run's namespace."""

    name: str = _name_field("pod.env[].valueFrom ...KeyRef.name")
    key: str = Field(min_length=1, max_length=253, description="The key.")
    optional: bool | None = Field(default=None, description="Start even if the key is missing.")


class EnvValueFrom(ApiModel):
    """Where an environment variable's value comes from: exactly one source."""

    model_config = cel(
        (
            "has(self.configMapKeyRef) != has(self.secretKeyRef)",
            "set exactly one of configMapKeyRef or secretKeyRef",
        ),
    )

    config_map_key_ref: KeyRef | None = Field(default=None, description="A ConfigMap key.")
    secret_key_ref: KeyRef | None = Field(default=None, description="A Secret key.")


class EnvVar(ApiModel):
    """An environment variable of the trainer container."""

    model_config = cel(
        ("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both"),
    )

    name: str = Field(
        min_length=1,
        max_length=256,
        pattern=_ENV_NAME,
        json_schema_extra=pattern_rule(
            "pod.env[].name must be an environment variable name (letters, digits, '_', '-', '.')",
            (
                f"!self.startsWith('FERMATA_') && !(self in {_cel_list(RESERVED_ENV)})",
                "pod.env[].name may not be FERMATA_* or "
                + ", ".join(RESERVED_ENV)
                + ": the operator sets those for the trainer",
            ),
        ),
        description="Variable name; not FERMATA_* nor " + ", ".join(RESERVED_ENV) + ".",
    )
    value: str | None = Field(default=None, max_length=32768, description="A literal value.")
    value_from: EnvValueFrom | None = Field(default=None, description="A ConfigMap or Secret key.")


class NameRef(ApiModel):
    """A ConfigMap or Secret of the run's namespace."""

    name: str = _name_field("pod.envFrom[] ...Ref.name")
    optional: bool | None = Field(default=None, description="Start even if it is missing.")


class EnvFromSource(ApiModel):
    """All keys of a ConfigMap or Secret as environment variables (the operator's own variables
    always take precedence)."""

    model_config = cel(
        ("has(self.configMapRef) != has(self.secretRef)", "set exactly one of configMapRef or secretRef"),
    )

    prefix: str | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=field_rules(
            ("!self.startsWith('FERMATA_')", "pod.envFrom[].prefix may not start with FERMATA_"),
        ),
        description="Prefix of every variable name.",
    )
    config_map_ref: NameRef | None = Field(default=None, description="A ConfigMap.")
    secret_ref: NameRef | None = Field(default=None, description="A Secret.")


# ----------------------------------------------------------------------------- volumes


class KeyToPath(ApiModel):
    """A key of a ConfigMap or Secret projected to a file."""

    key: str = Field(min_length=1, max_length=253, description="The key.")
    path: str = Field(
        max_length=253,
        pattern=_REL_PATH,
        description="Relative path of the file in the volume (the API server refuses '..').",
    )
    mode: int | None = Field(default=None, ge=0, le=0o777, description="File mode bits.")


class ConfigMapVolume(ApiModel):
    """A ConfigMap of the run's namespace as files."""

    name: str = _name_field("pod.volumes[].configMap.name")
    items: list[KeyToPath] | None = Field(default=None, max_length=16, description="Keys to project.")
    default_mode: int | None = Field(default=None, ge=0, le=0o777, description="Default file mode bits.")
    optional: bool | None = Field(default=None, description="Start even if it is missing.")


class SecretVolume(ApiModel):
    """A Secret of the run's namespace as files."""

    secret_name: str = _name_field("pod.volumes[].secret.secretName")
    items: list[KeyToPath] | None = Field(default=None, max_length=16, description="Keys to project.")
    default_mode: int | None = Field(default=None, ge=0, le=0o777, description="Default file mode bits.")
    optional: bool | None = Field(default=None, description="Start even if it is missing.")


class EmptyDirVolume(ApiModel):
    """A scratch directory that lives as long as the pod."""

    medium: str | None = Field(default=None, pattern="^(Memory)?$", description="'' (disk) or Memory.")
    size_limit: str | None = Field(
        default=None,
        max_length=64,
        json_schema_extra=field_rules(
            ("isQuantity(self)", "emptyDir.sizeLimit must be a Kubernetes quantity such as 10Gi"),
        ),
        description="Size limit, e.g. 10Gi.",
    )


class ClaimVolume(ApiModel):
    """A PersistentVolumeClaim of the run's namespace."""

    claim_name: str = _name_field("pod.volumes[].persistentVolumeClaim.claimName")
    read_only: bool | None = Field(default=None, description="Mount read-only.")


class ProjectedKeys(ApiModel):
    """A ConfigMap or Secret inside a projected volume."""

    name: str = _name_field("pod.volumes[].projected.sources[] ...name")
    items: list[KeyToPath] | None = Field(default=None, max_length=16, description="Keys to project.")
    optional: bool | None = Field(default=None, description="Start even if it is missing.")


class TokenProjection(ApiModel):
    """A ServiceAccount token for another audience (e.g. a cloud's workload identity)."""

    audience: str | None = Field(default=None, max_length=512, description="Intended audience.")
    expiration_seconds: int | None = Field(
        default=None, ge=600, le=86400 * 2, description="Requested lifetime in seconds."
    )
    path: str = Field(
        max_length=1024,
        pattern=_REL_PATH,
        json_schema_extra=pattern_rule("serviceAccountToken.path must be a relative path"),
        description="File of the token in the volume.",
    )


class ProjectionSource(ApiModel):
    """One source of a projected volume: exactly one of configMap, secret, serviceAccountToken."""

    model_config = cel(
        (
            "[has(self.configMap), has(self.secret), has(self.serviceAccountToken)].filter(x, x).size() == 1",
            "set exactly one of configMap, secret or serviceAccountToken",
        ),
    )

    config_map: ProjectedKeys | None = Field(default=None, description="ConfigMap keys.")
    secret: ProjectedKeys | None = Field(default=None, description="Secret keys.")
    service_account_token: TokenProjection | None = Field(default=None, description="A bound token.")


class ProjectedVolume(ApiModel):
    """Several sources in one directory."""

    sources: list[ProjectionSource] = Field(min_length=1, max_length=8, description="The sources.")
    default_mode: int | None = Field(default=None, ge=0, le=0o777, description="Default file mode bits.")


_VOLUME_SOURCES = ("configMap", "secret", "emptyDir", "persistentVolumeClaim", "projected")


class Volume(ApiModel):
    """An extra volume of the trainer pod: exactly one of the allowed sources (no hostPath)."""

    model_config = cel(
        (
            "[" + ", ".join(f"has(self.{s})" for s in _VOLUME_SOURCES) + "].filter(x, x).size() == 1",
            "a volume sets exactly one of "
            + ", ".join(_VOLUME_SOURCES)
            + " (hostPath and other volume types are not allowed)",
        ),
    )

    name: str = Field(
        max_length=63,
        pattern=_DNS_LABEL_ONLY,
        json_schema_extra=pattern_rule(
            "pod.volumes[].name must be a DNS label: lowercase letters, digits and '-', at most 63",
            (
                f"!(self in {_cel_list(RESERVED_VOLUMES)})",
                "pod.volumes[].name may not be "
                + ", ".join(RESERVED_VOLUMES)
                + ": the operator's own volumes",
            ),
        ),
        description="Volume name; not " + ", ".join(RESERVED_VOLUMES) + ".",
    )
    config_map: ConfigMapVolume | None = Field(default=None, description="A ConfigMap.")
    secret: SecretVolume | None = Field(default=None, description="A Secret.")
    empty_dir: EmptyDirVolume | None = Field(default=None, description="An empty directory.")
    persistent_volume_claim: ClaimVolume | None = Field(default=None, description="A PersistentVolumeClaim.")
    projected: ProjectedVolume | None = Field(default=None, description="A projected volume.")


#: The mountPath rule that keeps the operator's own mounts in place.
_MOUNT_PATH_RULE = (
    f"!(self in {_cel_list(RESERVED_MOUNT_PATHS)}) && !{_cel_list(RESERVED_MOUNT_DIRS)}.exists(d, "
    "self == d || self.startsWith(d + '/') || d.startsWith(self + '/'))",
    "pod.volumeMounts[].mountPath may not be "
    + ", ".join(RESERVED_MOUNT_PATHS)
    + " nor on, above or under "
    + ", ".join(RESERVED_MOUNT_DIRS)
    + ": the operator's config and scratch volumes live there",
)


class VolumeMount(ApiModel):
    """Where one of spec.pod.volumes is mounted in the trainer container."""

    name: str = Field(max_length=63, description="Name of one of spec.pod.volumes.")
    mount_path: str = Field(
        max_length=1024,
        pattern=_ABS_PATH,
        json_schema_extra=pattern_rule(
            "pod.volumeMounts[].mountPath must be an absolute path without a trailing '/'",
            ("!self.split('/').exists(s, s == '..' || s == '.')", "mountPath may not contain '.' or '..'"),
            _MOUNT_PATH_RULE,
        ),
        description="Absolute path in the container.",
    )
    sub_path: str | None = Field(
        default=None,
        max_length=1024,
        pattern=_REL_PATH,
        json_schema_extra=pattern_rule(
            "pod.volumeMounts[].subPath must be a relative path",
            ("!self.split('/').exists(s, s == '..')", "subPath may not contain '..'"),
        ),
        description="Path inside the volume to mount instead of its root.",
    )
    read_only: bool | None = Field(default=None, description="Mount read-only.")


# ----------------------------------------------------------------------------- placement


class NodeSelectorRequirement(ApiModel):
    """A node label requirement."""

    key: str = Field(
        min_length=1,
        max_length=316,
        json_schema_extra=field_rules(
            (
                f"!(self in {_cel_list(RESERVED_NODE_LABELS)})",
                "node affinity may not use "
                + ", ".join(RESERVED_NODE_LABELS)
                + ": set spec.resources.capacity and instanceTypes instead",
            ),
        ),
        description="Node label key.",
    )
    operator: str = Field(pattern="^(In|NotIn|Exists|DoesNotExist|Gt|Lt)$", description="In, NotIn, ...")
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=64, description="Values for In, NotIn, Gt, Lt."
    )


class NodeSelectorTerm(ApiModel):
    """Requirements ANDed together."""

    match_expressions: list[NodeSelectorRequirement] = Field(
        min_length=1, max_length=16, description="Node label requirements."
    )


class RequiredNodeAffinity(ApiModel):
    """Terms ORed together, each ANDed with the operator's own placement."""

    node_selector_terms: list[NodeSelectorTerm] = Field(min_length=1, max_length=8, description="Terms.")


class PreferredTerm(ApiModel):
    """A weighted preference."""

    weight: int = Field(ge=1, le=100, description="Weight 1-100.")
    preference: NodeSelectorTerm = Field(description="The preferred nodes.")


class NodeAffinity(ApiModel):
    """Node affinity added to the operator's spot/instance-type placement."""

    required_during_scheduling_ignored_during_execution: RequiredNodeAffinity | None = Field(
        default=None, description="Nodes the pod must run on (combined with the operator's placement)."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredTerm] | None = Field(
        default=None, max_length=16, description="Nodes the scheduler prefers."
    )


class Affinity(ApiModel):
    """Scheduling additions."""

    node_affinity: NodeAffinity | None = Field(default=None, description="Node affinity additions.")


class LabelSelectorRequirement(ApiModel):
    """A pod label requirement."""

    key: str = Field(min_length=1, max_length=316, description="Label key.")
    operator: str = Field(pattern="^(In|NotIn|Exists|DoesNotExist)$", description="In, NotIn, Exists, ...")
    values: list[Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=64, description="Values for In and NotIn."
    )


class LabelSelector(ApiModel):
    """Pods counted by a spread constraint."""

    match_labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None, max_length=16, description="Exact labels."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, max_length=16, description="Label requirements."
    )


class TopologySpreadConstraint(ApiModel):
    """How trainer pods spread over a topology (zones, nodes)."""

    max_skew: int = Field(ge=1, le=1000, description="Largest allowed difference between domains.")
    topology_key: str = Field(min_length=1, max_length=316, description="Node label of the domains.")
    when_unsatisfiable: str = Field(
        pattern="^(DoNotSchedule|ScheduleAnyway)$", description="DoNotSchedule or ScheduleAnyway."
    )
    label_selector: LabelSelector | None = Field(default=None, description="Pods that count.")
    min_domains: int | None = Field(default=None, ge=1, le=1000, description="Minimum number of domains.")
    match_label_keys: list[Annotated[str, Field(max_length=316)]] | None = Field(
        default=None, max_length=16, description="Pod label keys whose values select the pods that count."
    )


class LocalObjectReference(ApiModel):
    """An object of the run's namespace, by name."""

    name: str = _name_field("pod.imagePullSecrets[].name")


# ----------------------------------------------------------------------------- spec.pod


class PodOverrides(ApiModel):
    """Additions to the trainer pod. The operator's own labels, annotations, environment,
    volumes, GPU resources and placement always stay; these only add to them."""

    model_config = cel(
        (
            "!has(self.volumeMounts) || self.volumeMounts.all(m, has(self.volumes) && "
            "self.volumes.exists(v, v.name == m.name))",
            "every pod.volumeMounts[].name must name one of pod.volumes",
            ".volumeMounts",
        ),
    )

    labels: dict[str, Annotated[str, Field(max_length=63)]] | None = Field(
        default=None,
        max_length=32,
        json_schema_extra=_metadata_map("labels", RESERVED_LABELS, values=True),
        description="Extra pod labels (not in the fermata.dev domain).",
    )
    annotations: dict[str, Annotated[str, Field(max_length=4096)]] | None = Field(
        default=None,
        max_length=32,
        json_schema_extra=_metadata_map("annotations", (), values=False),
        description="Extra pod annotations (not in the fermata.dev domain).",
    )
    env: list[EnvVar] | None = Field(
        default=None,
        max_length=64,
        description="Extra environment variables of the trainer container.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    env_from: list[EnvFromSource] | None = Field(
        default=None, max_length=16, description="ConfigMaps and Secrets whose keys become variables."
    )
    volumes: list[Volume] | None = Field(
        default=None,
        max_length=16,
        description="Extra volumes.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volume_mounts: list[VolumeMount] | None = Field(
        default=None, max_length=16, description="Where the extra volumes are mounted in the trainer."
    )
    image_pull_secrets: list[LocalObjectReference] | None = Field(
        default=None, max_length=8, description="Secrets for pulling the trainer image."
    )
    affinity: Affinity | None = Field(default=None, description="Node affinity added to the operator's.")
    topology_spread_constraints: list[TopologySpreadConstraint] | None = Field(
        default=None, max_length=8, description="Topology spread constraints of the trainer pod."
    )
