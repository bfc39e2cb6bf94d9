{{/*
Names are fixed, as in manifests/: the operator peers through the ClusterKopfPeering (or KopfPeerings)
named `pgwarden` and its ClusterRole is granted that one name, so one release per cluster.
*/}}

{{/* Labels on every object: kustomize's part-of, Helm's own, then the user's commonLabels. */}}
{{- define "pgwarden.labels" -}}
app.kubernetes.io/part-of: pgwarden
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The operator's pods, as manifests/operator selects them (selectors are immutable: never templated). */}}
{{- define "pgwarden.selectorLabels" -}}
app.kubernetes.io/name: pgwarden
app.kubernetes.io/component: controller
{{- end }}

{{/* metadata.labels and annotations of an operator object: its selector labels plus the common ones. */}}
{{- define "pgwarden.controllerMetadata" -}}
labels:
  {{- include "pgwarden.selectorLabels" . | nindent 2 }}
  {{- include "pgwarden.labels" . | nindent 2 }}
{{- include "pgwarden.annotations" . }}
{{- end }}

{{/* metadata.labels and annotations of any other object. */}}
{{- define "pgwarden.metadata" -}}
labels:
  {{- include "pgwarden.labels" . | nindent 2 }}
{{- include "pgwarden.annotations" . }}
{{- end }}

{{- define "pgwarden.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given (the tag is then ignored). */}}
{{- define "pgwarden.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/*
The operator's RBAC rules, those of manifests/rbac/clusterrole.yaml (tests/e2e/test_helm_chart.py holds
them equal). The argument is the peering resource: clusterkopfpeerings for the ClusterRole (every
namespace), kopfpeerings for a Role in a watched namespace (what `pgwarden run --namespace` peers through).
*/}}
{{- define "pgwarden.rules" -}}
# Watch policies (kopf lists then watches); get one by name to re-read it when a status write finds it
# changed; patch them to add/remove the finalizer and kopf's progress annotations. Never create, update
# or delete: the spec belongs to the user.
- apiGroups: ["pgwarden.dev"]
  resources: ["postgrespolicies"]
  verbs: ["get", "list", "watch", "patch"]
# Report what was seen and done: a merge patch of status under a resourceVersion precondition.
- apiGroups: ["pgwarden.dev"]
  resources: ["postgrespolicies/status"]
  verbs: ["patch"]
# The pods index: which pods exist, their labels, phase and IP. Read-only. get: before the first action
# on a new connection the pod is read by name, to confirm it still has that IP.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# Credentials named by a policy, read by name only: no list or watch of Secrets.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# One Event per target per cycle that acted (SessionsTerminated, QueriesCancelled, ...).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
# Policy reports (openreports.io, used only when its CRDs are installed; --no-policy-reports turns them off):
# one Report per policy. get: read what an earlier process wrote; create and patch: write it when it changes;
# delete: remove it with its policy. No list or watch.
- apiGroups: ["openreports.io"]
  resources: ["reports"]
  verbs: ["get", "create", "patch", "delete"]
# High availability: replicas see each other through kopf's peering objects. kopf lists and watches the
# whole collection and never reads one by name...
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  verbs: ["list", "watch"]
# ...creates the peering object "pgwarden" at start-up if it is missing (create takes no name)...
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  verbs: ["create"]
# ...and keeps its own record alive in status by patching that one object.
- apiGroups: ["kopf.dev"]
  resources: [{{ . | quote }}]
  resourceNames: ["pgwarden"]
  verbs: ["patch"]
{{- end }}
