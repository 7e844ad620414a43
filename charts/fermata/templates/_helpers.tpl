{{/* Name of the chart (overridable with nameOverride is not offered: one name, fermata). */}}
{{- define "fermata.name" -}}
fermata
{{- end }}

{{/* Full name: the release name, with "-fermata" unless the release name already says it. */}}
{{- define "fermata.fullname" -}}
{{- if contains "fermata" .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-fermata" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end }}

{{- define "fermata.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fermata.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "fermata.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "fermata.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: fermata
{{- end }}

{{- define "fermata.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fermata.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end }}

{{- define "fermata.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end }}

{{/* "true" when the operator watches the whole cluster. */}}
{{- define "fermata.clusterwide" -}}
{{- if empty .Values.watchNamespaces -}}true{{- end -}}
{{- end }}

{{/* "true" when replicas run with kopf peering. */}}
{{- define "fermata.peering" -}}
{{- if gt (int .Values.replicaCount) 1 -}}true{{- end -}}
{{- end }}

{{/*
What the operator does inside a namespace it runs TrainingRuns in — every verb enumerated.
Granted by a Role per watched namespace, or (cluster-wide mode) by a ClusterRole bound
cluster-wide. The trainer Roles the operator creates grant get on trainingruns and get/patch on
trainingruns/status; RBAC lets it create them only because it holds those verbs itself (no
`escalate`/`bind`).
*/}}
{{- define "fermata.namespacedRules" -}}
# Trainer pods: created, watched (kopf index), stop-annotated, finalizer released (JSON patch), deleted.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, create, delete, patch]
# The trainer's configuration (created, patched when the spec changes).
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# The trainer's ServiceAccount, Role and RoleBinding (its own run's status only).
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
# Decisions as Events on the TrainingRun (the operator's and kopf's).
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# TrainingRuns: watched, finalizer and kopf annotations patched; status written.
- apiGroups: [fermata.dev]
  resources: [trainingruns]
  verbs: [get, list, watch, patch]
- apiGroups: [fermata.dev]
  resources: [trainingruns/status]
  verbs: [get, patch]
{{- if include "fermata.peering" . }}
{{- if not (include "fermata.clusterwide" .) }}
# kopf peering (replicaCount > 1): replicas announce themselves in the KopfPeering.
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
{{- end }}
