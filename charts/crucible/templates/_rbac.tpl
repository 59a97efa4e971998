{{/*
What the operator (crucible.operator) and Kopf use, no wildcards. Split in two so an operator
limited to operator.watchNamespaces gets Roles in those namespaces and only the cluster-scoped
rest as a ClusterRole.
*/}}

{{/* Rules on namespaced resources. */}}
{{- define "crucible.rbacNamespacedRules" -}}
# The five Crucible kinds: watch them, patch finalizers and Kopf's annotations, write status.
- apiGroups: [crucible.dev]
  resources: [datapipelines, pretrainruns, finetuneruns, preferenceruns, quantizejobs]
  verbs: [get, list, watch, patch, update]
- apiGroups: [crucible.dev]
  resources: [datapipelines/status, pretrainruns/status, finetuneruns/status, preferenceruns/status, quantizejobs/status]
  verbs: [get, patch, update]
# One Indexed Job, headless Service and spec ConfigMap per attempt.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [services, configmaps]
  verbs: [get, list, watch, create, patch, delete]
# Observe attempts: pod phases, exit codes and termination messages, the last log lines of a
# failed pod; delete a pod stuck on a lost node.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch, delete]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
# Gang scheduling: Kueue workloads, Volcano and scheduler-plugins PodGroups.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch]
- apiGroups: [scheduling.volcano.sh, scheduling.x-k8s.io]
  resources: [podgroups]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}

{{/* Rules on cluster-scoped resources. */}}
{{- define "crucible.rbacClusterRules" -}}
# The nodes attempts ran on: NotReady or gone means an infrastructure fault.
- apiGroups: [""]
  resources: [nodes]
  verbs: [get, list, watch]
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
