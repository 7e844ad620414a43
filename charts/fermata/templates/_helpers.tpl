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
# The namespace's trainer identity (ServiceAccount, Role, RoleBinding fermata-trainer: created once,
# never changed); a run's own ServiceAccount and RoleBinding when spec.serviceAccount asks for
# them, deleted with its pods spec.ttlSecondsAfterFinished after the run finished.
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get, create, delete]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [rolebindings]
  verbs: [get, create, delete]
# Decisions as Events on the TrainingRun (the operator's and kopf's).
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
# TrainingRuns: watched, finalizer and kopf annotations patched; status written.
- apiGroups: [fermata.dev]
  resources: [trainingruns]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [fermata.dev]
  resources: [trainingruns/status]
  verbs: [get, patch]
# TrainingBudgets (team budgets): watched (kopf index); their status written. No finalizer.
- apiGroups: [fermata.dev]
  resources: [trainingbudgets]
  verbs: [get, list, watch]
- apiGroups: [fermata.dev]
  resources: [trainingbudgets/status]
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

{{/* The operator's identity as the API server sees it (admission policies match on it). */}}
{{- define "fermata.operatorUsername" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "fermata.serviceAccountName" .) -}}
{{- end }}

{{/*
Namespaces the operator never writes in: the system ones and its own (the release namespace,
which holds the price table and the operator's token), plus admissionPolicies.extraProtectedNamespaces.
A JSON list, which is also a CEL list literal.
*/}}
{{- define "fermata.protectedNamespaces" -}}
{{- $ns := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- toJson (concat $ns .Values.admissionPolicies.extraProtectedNamespaces | uniq) -}}
{{- end }}

{{/*
A ValidatingAdmissionPolicyBinding that denies. Arguments: (dict "root" $ "name" NAME "scoped" BOOL).
scoped: in namespaced mode, only requests in the watched namespaces (policies that apply to
every user must not reach runs another Fermata release owns).
*/}}
{{- define "fermata.policyBinding" -}}
{{- $root := .root -}}
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {{ .name }}
  labels:
    {{- include "fermata.labels" $root | nindent 4 }}
spec:
  policyName: {{ .name }}
  validationActions: [Deny]
  {{- if and .scoped (not (include "fermata.clusterwide" $root)) }}
  matchResources:
    namespaceSelector:
      matchExpressions:
        - key: kubernetes.io/metadata.name
          operator: In
          values: {{ toJson $root.Values.watchNamespaces }}
  {{- end }}
{{- end }}

{{/* Refuse values under which the admission policies would lock the operator out of its own runs. */}}
{{- define "fermata.checkPolicyValues" -}}
{{- if .Values.admissionPolicies.enabled -}}
{{- $protected := fromJsonArray (include "fermata.protectedNamespaces" .) -}}
{{- range .Values.watchNamespaces -}}
{{- if has . $protected -}}
{{- fail (printf "watchNamespaces: %s is a namespace the operator may not write in (system namespaces, the release namespace %s, admissionPolicies.extraProtectedNamespaces); run TrainingRuns elsewhere" . $.Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end }}
