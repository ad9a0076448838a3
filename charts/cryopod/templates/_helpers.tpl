{{/* Names and labels shared by every object. */}}
{{- define "cryopod.labels" -}}
app.kubernetes.io/name: cryopod
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "cryopod.operatorSelector" -}}
app.kubernetes.io/name: cryopod
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "cryopod.agentSelector" -}}
app.kubernetes.io/name: cryopod
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node-agent
{{- end }}

{{- define "cryopod.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end }}

{{/* The Secret holding the manifest signing key. */}}
{{- define "cryopod.signingSecret" -}}
{{- .Values.signing.existingSecret | default (printf "%s-signing" .Release.Name) -}}
{{- end }}

{{/* The scrape jobs the chart's monitors set, which the alerting rules select. */}}
{{- define "cryopod.operatorJob" -}}
{{- printf "%s-operator" .Release.Name -}}
{{- end }}

{{- define "cryopod.agentJob" -}}
{{- printf "%s-node-agent" .Release.Name -}}
{{- end }}
