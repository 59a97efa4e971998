{{/*
Exactly crucible.operator.rbac.RULES (what the operator and Kopf call, no wildcards; tests in
tests/deploy and tests/operator keep the two equal). Split in two so an operator limited to
operator.watchNamespaces gets Roles in those namespaces and only the cluster-scoped rest as a
ClusterRole.
*/}}

{{/* Rules on namespaced resources. */}}
{{- define "crucible.rbacNamespacedRules" -}}
# Kopf watches the five kinds (no finalizers, no annotations); the reconciler reads the runs
# a fromRun references.
- apiGroups: [crucible.dev]
  resources: [datapipelines, finetuneruns, preferenceruns, pretrainruns, quantizejobs]
  verbs: [get, list, watch]
# One merge-patch of status per reconcile pass.
- apiGroups: [crucible.dev]
  resources: [datapipelines/status, finetuneruns/status, preferenceruns/status, pretrainruns/status, quantizejobs/status]
  verbs: [get, patch]
# Each attempt's Indexed Jobs (watched, to react to their pods at once), headless Service and
# spec ConfigMap.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, create, delete]
# Pods of an attempt: phases, exit codes, termination messages, nodes.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list]
# The operator's and Kopf's events.
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create]
# Gang scheduling: PodGroups of Volcano and of the coscheduling plugin.
- apiGroups: [scheduling.volcano.sh, scheduling.x-k8s.io]
  resources: [podgroups]
  verbs: [get, create, delete]
{{- end }}

{{/* Rules on cluster-scoped resources. */}}
{{- define "crucible.rbacClusterRules" -}}
# Is the node of a failed pod NotReady or gone (an infrastructure fault)?
- apiGroups: [""]
  resources: [nodes]
  verbs: [get]
# Kopf: discover CRDs and namespaces as they come and go.
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [get, list, watch]
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
{{- end }}

{{/* Kopf peering: cluster-wide operators use ClusterKopfPeerings, namespaced ones KopfPeerings. */}}
{{- define "crucible.rbacPeeringRule" -}}
- apiGroups: [kopf.dev]
  resources: [{{ if .Values.operator.watchNamespaces }}kopfpeerings{{ else }}clusterkopfpeerings{{ end }}]
  verbs: [get, list, watch, patch]
{{- end }}
