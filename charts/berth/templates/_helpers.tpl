{{/*
Labels of every object: the kustomize base's app.kubernetes.io/part-of plus Helm's usual ones. Selectors use only
app.kubernetes.io/name, as in deploy/ (selectors cannot change after install).
*/}}
{{- define "berth.labels" -}}
app.kubernetes.io/part-of: berth
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "berth.image" -}}
{{ printf "%s:%s" .Values.image.repository .Values.image.tag | quote }}
{{- end }}

{{/*
A scalar value as text. Helm reads every number of a values file as a float, which toString would write as
1.2096e+06: whole numbers are written as integers.
*/}}
{{- define "berth.scalar" -}}
{{- if and (kindIs "float64" .) (eq . (floor .)) }}{{ int64 . }}{{ else }}{{ toString . }}{{ end }}
{{- end }}

{{- define "berth.rustLog" -}}
{{ printf "%s,kube=warn,hyper=warn" .Values.logLevel | quote }}
{{- end }}

{{/*
An agent configuration (docs/agent-config.md) from a list of pools: one [[pool]] table each. Values are written
as JSON scalars, which TOML reads the same way (strings with JSON escapes, numbers, booleans). Fails when a pool's
root is outside every agent.hostPaths entry: such a pool would never be ready (its root is not in the container).
Also fails, as the agent would refuse to start, on a pool name used twice and on a root inside another, and on an
lvm pool for an agent without the lvm mode (no /dev, not privileged: it could never be ready).
Argument: dict "pools" LIST "hostPaths" LIST "lvm" BOOL "where" STRING (for the error message).
*/}}
{{- define "berth.agentToml" -}}
{{- $hostPaths := .hostPaths }}
{{- $where := .where }}
{{- range $i, $pool := .pools }}
{{- $root := printf "%s/" (trimSuffix "/" (toString $pool.root)) }}
{{- if and (eq (toString $pool.backend) "lvm") (not $.lvm) }}
{{- fail (printf "%s: pool %q is an lvm pool, and this agent runs without the lvm mode: set lvm: true (agent.lvm, or the override's)" $where (toString $pool.name)) }}
{{- end }}
{{- range $j, $other := $.pools }}
{{- if lt $j $i }}
{{- $otherRoot := printf "%s/" (trimSuffix "/" (toString $other.root)) }}
{{- if eq (toString $other.name) (toString $pool.name) }}
{{- fail (printf "%s: pool %q is configured twice" $where (toString $pool.name)) }}
{{- end }}
{{- if or (hasPrefix $otherRoot $root) (hasPrefix $root $otherRoot) }}
{{- fail (printf "%s: pools %q and %q: one root lies inside the other" $where (toString $other.name) (toString $pool.name)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $inside := false }}
{{- range $hostPaths }}
{{- if hasPrefix (printf "%s/" (trimSuffix "/" .)) $root }}{{ $inside = true }}{{ end }}
{{- end }}
{{- if not $inside }}
{{- fail (printf "%s: pool %q has root %q, which is under none of agent.hostPaths %v: the agent could not see it" $where (toString $pool.name) (toString $pool.root) $hostPaths) }}
{{- end }}
{{- if $i }}{{ "\n" }}{{ end }}
[[pool]]
{{- range $key := keys $pool | sortAlpha }}
{{ $key }} = {{ get $pool $key | toJson }}
{{- end }}
{{- end }}
{{- end }}
