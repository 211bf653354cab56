{{/* Text generation (issue 17; values `generation.*`, docs/generation.md). Everything here renders only with
generation.enabled, so the default manifests do not change. */}}

{{/* Cross-field checks of the generation values the schema cannot express. */}}
{{- define "loraserve.generation.validate" -}}
{{- $g := .Values.generation }}
{{- if $g.enabled }}
{{- if not (has $g.model.defaultVariant $g.model.variants) }}
{{- fail (printf "generation.model.defaultVariant %q is not one of generation.model.variants %v" $g.model.defaultVariant $g.model.variants) }}
{{- end }}
{{- $devices := mul (int $g.parallelism.tensorParallelSize) (int $g.parallelism.pipelineParallelSize) }}
{{- if and (gt $devices 1) (not .Values.gpu.enabled) }}
{{- fail (printf "generation.parallelism %vx%v splits the model over GPUs: set gpu.enabled=true and gpu.count=%v" $g.parallelism.tensorParallelSize $g.parallelism.pipelineParallelSize $devices) }}
{{- end }}
{{- if and .Values.gpu.enabled (gt $devices 1) (ne (int .Values.gpu.count) $devices) }}
{{- fail (printf "gpu.count (%v) must equal generation.parallelism.tensorParallelSize x pipelineParallelSize (%v): one pod holds one TP x PP unit" .Values.gpu.count $devices) }}
{{- end }}
{{- end }}
{{- end }}

{{/* Triton's --load-model arguments of the generator variants. */}}
{{- define "loraserve.generation.loadModels" -}}
{{- if .Values.generation.enabled }}
{{- range .Values.generation.model.variants }}
- --load-model={{ $.Values.generation.model.namePrefix }}_{{ . }}
{{- end }}
{{- end }}
{{- end }}

{{/* The engine's KV-cache budget on the Triton container (overrides the published config.pbtxt). */}}
{{- define "loraserve.generation.tritonEnv" -}}
{{- $kv := .Values.generation.kvCache }}
{{- if .Values.generation.enabled }}
{{- if $kv.maxBytes }}
- { name: LORASERVE_GENERATOR_MAX_KV_CACHE_BYTES, value: {{ $kv.maxBytes | int64 | quote }} }
{{- end }}
{{- if $kv.maxActiveSequences }}
- { name: LORASERVE_GENERATOR_MAX_ACTIVE_SEQUENCES, value: {{ $kv.maxActiveSequences | int64 | quote }} }
{{- end }}
{{- end }}
{{- end }}

{{/* The gateway's GATEWAY_GENERATE__* variables. */}}
{{- define "loraserve.generation.gatewayEnv" -}}
{{- $g := .Values.generation }}
{{- if $g.enabled }}
- { name: GATEWAY_GENERATE__ENABLED, value: "true" }
- { name: GATEWAY_GENERATE__MODEL_NAME_PREFIX, value: {{ $g.model.namePrefix | quote }} }
- { name: GATEWAY_GENERATE__VARIANTS, value: {{ join "," $g.model.variants | quote }} }
- { name: GATEWAY_GENERATE__DEFAULT_VARIANT, value: {{ $g.model.defaultVariant | quote }} }
- { name: GATEWAY_GENERATE__MAX_NEW_TOKENS, value: {{ $g.maxNewTokens | quote }} }
- { name: GATEWAY_GENERATE__MAX_STREAMS, value: {{ $g.maxStreams | quote }} }
- { name: GATEWAY_GENERATE__REQUEST_TIMEOUT_SECONDS, value: {{ $g.requestTimeoutSeconds | quote }} }
{{- end }}
{{- end }}
