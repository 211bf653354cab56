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

{{/* A number (or a numeric string, as --set passes it) as a Kubernetes milli-quantity: 0.2 -> "200m". Rounded
to the nearest milli-unit, and never "0m" for a positive target (the API server refuses a zero target). */}}
{{- define "loraserve.milli" -}}
{{- $m := round (mulf (float64 .) 1000.0) 0 | int64 }}
{{- if and (lt $m 1) (gt (float64 .) 0.0) }}{{ $m = 1 }}{{ end }}
{{- printf "%dm" $m | quote }}
{{- end }}

{{/* An image reference: repository:tag, plus @digest when one is set (the release workflow writes it). */}}
{{- define "loraserve.imageRef" -}}
{{- if .digest }}{{ printf "%s:%s@%s" .repository .tag .digest }}{{ else }}{{ printf "%s:%s" .repository .tag }}{{ end }}
{{- end }}

{{/* The Triton image and the model-config set for this pod's target (gpu.enabled). */}}
{{- define "loraserve.tritonImage" -}}
{{- include "loraserve.imageRef" (ternary .Values.triton.gpuImage .Values.triton.image .Values.gpu.enabled) }}
{{- end }}
{{- define "loraserve.tritonPullPolicy" -}}
{{- (ternary .Values.triton.gpuImage .Values.triton.image .Values.gpu.enabled).pullPolicy }}
{{- end }}
{{- define "loraserve.target" -}}
{{- if .Values.gpu.enabled }}{{ ternary "gpu-tensorrt" "gpu" (eq .Values.triton.gpuAccelerator "tensorrt") }}{{ else }}cpu{{ end }}
{{- end }}

{{/* Exec probe on Triton's loopback-only HTTP port. python3 is in both images (the CPU image's venv; NVIDIA's
image for its python backend); a non-2xx answer raises, so the probe fails. */}}
{{- define "loraserve.tritonProbe" -}}
{{- $url := printf "http://127.0.0.1:%v%s" .root.Values.triton.httpPort .path }}
exec: { command: ["python3", "-c", "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)", {{ $url | quote }}] }
{{- end }}

{{/* Cross-field checks the schema cannot express; each failure names the values to fix. */}}
{{- define "loraserve.validate" -}}
{{- $c := .Values.gateway.config }}
{{- if not (has $c.defaultVariant $c.variants) }}
{{- fail (printf "gateway.config.defaultVariant %q is not one of gateway.config.variants %v" $c.defaultVariant $c.variants) }}
{{- end }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%v) > autoscaling.maxReplicas (%v)" .Values.autoscaling.minReplicas .Values.autoscaling.maxReplicas) }}
{{- end }}
{{- if and .Values.autoscaling.enabled (not .Values.serviceMonitor.enabled) (not .Values.autoscaling.scrapedElsewhere) }}
{{- fail "autoscaling.enabled needs the gateway's metrics scraped: set serviceMonitor.enabled=true (with the additionalLabels your Prometheus selects), or autoscaling.scrapedElsewhere=true if you scrape the pods another way" }}
{{- end }}
{{- if and (eq .Values.modelRepository.source "url") (or (not (or .Values.modelRepository.url .Values.modelRepository.urlSecret.name)) (not .Values.modelRepository.sha256)) }}
{{- fail "modelRepository.source=url needs modelRepository.url (or urlSecret.name) and modelRepository.sha256 (the archive's checksum)" }}
{{- end }}
{{- if and (eq .Values.modelRepository.source "pvc") (not .Values.modelRepository.existingClaim) }}
{{- fail "modelRepository.source=pvc needs modelRepository.existingClaim" }}
{{- end }}
{{- $drain := add (int .Values.gateway.preStopSleepSeconds) (ceil (float64 $c.drainGraceSeconds) | int) (ceil (float64 $c.drainTimeoutSeconds) | int) 10 }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%v) < preStopSleepSeconds + drainGraceSeconds + drainTimeoutSeconds + 10 s for Triton (%v): the kubelet would kill a draining pod" .Values.terminationGracePeriodSeconds $drain) }}
{{- end }}
{{- range $c.variants }}
{{- if not ($.Files.Get (printf "files/triton/%s/classifier_%s.pbtxt" (include "loraserve.target" $) .)) }}
{{- fail (printf "no Triton config for variant %q on target %s (files/triton/%s/): render it with python -m service.triton.model_config render" . (include "loraserve.target" $) (include "loraserve.target" $)) }}
{{- end }}
{{- end }}
{{- end }}
