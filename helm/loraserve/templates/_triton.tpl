{{/* The Triton container, rendered either as a native sidecar (an init container with restartPolicy Always) or as
a regular container (triton.nativeSidecar=false). */}}
{{- define "loraserve.tritonContainer" -}}
- name: triton
  image: {{ include "loraserve.tritonImage" . | quote }}
  imagePullPolicy: {{ include "loraserve.tritonPullPolicy" . }}
  {{- if .Values.triton.nativeSidecar }}
  # Native sidecar: started before the gateway, stopped only after the gateway has exited, so Triton never
  # unloads its models while the gateway still drains queued requests.
  restartPolicy: Always
  {{- end }}
  args:
    - tritonserver
    - --model-repository={{ .Values.modelRepository.mountPath }}
    - --model-control-mode=explicit
    {{- range .Values.gateway.config.variants }}
    - --load-model=classifier_{{ . }}
    {{- end }}
    {{- with include "loraserve.generation.loadModels" . }}
    {{- . | trim | nindent 4 }}
    {{- end }}
    # HTTP (with the model-control API: load/unload) and gRPC on loopback only: nothing outside this pod can
    # unload a model, even where NetworkPolicy is not enforced. The kubelet probes through exec instead.
    - --http-address=127.0.0.1
    - --http-port={{ .Values.triton.httpPort }}
    - --grpc-address=127.0.0.1
    - --grpc-port={{ .Values.triton.grpcPort }}
    - --metrics-port={{ .Values.triton.metricsPort }}
    - --exit-on-error=true
    - --strict-readiness=true
    - --exit-timeout-secs=10
    {{- range .Values.triton.extraArgs }}
    - {{ . }}
    {{- end }}
  {{- $generationEnv := include "loraserve.generation.tritonEnv" . }}
  {{- if or (not .Values.gpu.enabled) $generationEnv }}
  env:
    {{- if not .Values.gpu.enabled }}
    # A CPU pod on a GPU node must not grab the node's GPUs through the NVIDIA runtime's defaults.
    - { name: NVIDIA_VISIBLE_DEVICES, value: void }
    {{- end }}
    {{- with $generationEnv }}
    {{- . | trim | nindent 4 }}
    {{- end }}
  {{- end }}
  ports:
    - { name: triton-metrics, containerPort: {{ .Values.triton.metricsPort }}, protocol: TCP }
  # Startup budget: 10 s x startupProbeFailureThreshold (default 30 = 300 s) for Triton to load every model
  # (CPU: 3-4 s measured; TensorRT engine builds: minutes, raise the threshold).
  startupProbe:
    {{- include "loraserve.tritonProbe" (dict "root" . "path" "/v2/health/ready") | nindent 4 }}
    periodSeconds: 10
    failureThreshold: {{ .Values.triton.startupProbeFailureThreshold }}
    timeoutSeconds: 5
  # Liveness on /live, never /ready: a model reload must not restart the server (triton#7014).
  livenessProbe:
    {{- include "loraserve.tritonProbe" (dict "root" . "path" "/v2/health/live") | nindent 4 }}
    periodSeconds: 10
    failureThreshold: 3
    timeoutSeconds: 5
  readinessProbe:
    {{- include "loraserve.tritonProbe" (dict "root" . "path" "/v2/health/ready") | nindent 4 }}
    periodSeconds: 5
    failureThreshold: 2
    timeoutSeconds: 5
  {{- if not .Values.triton.nativeSidecar }}
  lifecycle:
    # Without native sidecars both containers get SIGTERM together: Triton waits out the gateway's drain first.
    preStop:
      exec:
        command: ["sleep", "{{ add (int .Values.gateway.preStopSleepSeconds) (ceil (float64 .Values.gateway.config.drainGraceSeconds) | int) (ceil (float64 .Values.gateway.config.drainTimeoutSeconds) | int) }}"]
  {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    requests:
      {{- toYaml .Values.triton.resources.requests | nindent 6 }}
    limits:
      {{- toYaml .Values.triton.resources.limits | nindent 6 }}
      {{- if .Values.gpu.enabled }}
      {{ .Values.gpu.resourceName }}: {{ .Values.gpu.count }}
      {{- end }}
  volumeMounts:
    - { name: model-repository, mountPath: {{ .Values.modelRepository.mountPath }}, readOnly: true }
    - { name: tmp, mountPath: /tmp, subPath: triton }
    - { name: dshm, mountPath: /dev/shm }
{{- end }}
