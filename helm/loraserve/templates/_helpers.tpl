{{/* Chart name, truncated to the 63 characters a DNS label allows. */}}
{{- define "loraserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: the release name, prefixed to the chart name unless it already contains it. */}}
{{- define "loraserve.fullname" -}}
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

{{- define "loraserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Kubernetes recommended labels (app.kubernetes.io/*) plus helm.sh/chart. */}}
{{- define "loraserve.labels" -}}
helm.sh/chart: {{ include "loraserve.chart" . }}
{{ include "loraserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: inference
app.kubernetes.io/part-of: loraserve
{{- end }}

{{/* Immutable selector labels: never add labels here that change between releases. */}}
{{- define "loraserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "loraserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Triton model names served, one per variant (the model repository contract: classifier_<variant>). */}}
{{- define "loraserve.tritonModels" -}}
{{- range .Values.gateway.config.variants }} --load-model=classifier_{{ . }}{{ end }}
{{- end }}

{{/* A number as a Kubernetes milli-quantity (0.2 -> "200m"), exact for HPA targets. */}}
{{- define "loraserve.milli" -}}
{{- printf "%dm" (mulf . 1000.0 | int) | quote }}
{{- end }}
