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

{{- define "berth.rustLog" -}}
{{ printf "%s,kube=warn,hyper=warn" .Values.logLevel | quote }}
{{- end }}

{{/*
An agent configuration (docs/agent-config.md) from a list of pools: one [[pool]] table each. Values are written
as JSON scalars, which TOML reads the same way (strings with JSON escapes, numbers, booleans). Fails when a pool's
root is outside every agent.hostPaths entry: such a pool would never be ready (its root is not in the container).
Argument: dict "pools" LIST "hostPaths" LIST "where" STRING (for the error message).
*/}}
{{- define "berth.agentToml" -}}
{{- $hostPaths := .hostPaths }}
{{- range $i, $pool := .pools }}
{{- $root := printf "%s/" (trimSuffix "/" (toString $pool.root)) }}
{{- $inside := false }}
{{- range $hostPaths }}
{{- if hasPrefix (printf "%s/" (trimSuffix "/" .)) $root }}{{ $inside = true }}{{ end }}
{{- end }}
{{- if not $inside }}
{{- fail (printf "%s: pool %q has root %q, which is under none of agent.hostPaths %v: the agent could not see it" $.where (toString $pool.name) (toString $pool.root) $hostPaths) }}
{{- end }}
{{- if $i }}{{ "\n" }}{{ end }}
[[pool]]
{{- range $key := keys $pool | sortAlpha }}
{{ $key }} = {{ get $pool $key | toJson }}
{{- end }}
{{- end }}
{{- end }}
