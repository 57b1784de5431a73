{{/* Chart name, truncated to 63 chars. */}}
{{- define "eplb.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: release-chart unless the release name already contains the chart name. */}}
{{- define "eplb.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "eplb.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "eplb.selectorLabels" -}}
app.kubernetes.io/name: {{ include "eplb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{- define "eplb.labels" -}}
helm.sh/chart: {{ include "eplb.chart" . }}
app.kubernetes.io/name: {{ include "eplb.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: eplb
{{- end }}

{{- define "eplb.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "eplb.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "eplb.redisName" -}}
{{- printf "%s-redis" (include "eplb.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The store URL when it is not in a Secret. */}}
{{- define "eplb.storeURL" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://%s:%d/0" (include "eplb.redisName" .) (int .Values.redis.port) }}
{{- else }}
{{- .Values.store.url }}
{{- end }}
{{- end }}

{{- define "eplb.tokenSecretName" -}}
{{- default (printf "%s-token" (include "eplb.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "eplb.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "eplb.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{/* Settings the chart manages itself: not allowed under .Values.config. */}}
{{- define "eplb.managedSettings" -}}
host grpc_port http_port store redis_prefix token token_file tls_cert tls_key tls_client_ca replica_id advertise_address
{{- end }}
