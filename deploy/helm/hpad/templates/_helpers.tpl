{{/* ---------------------------------------------------------------- names and labels */}}

{{- define "hpad.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "hpad.fullname" -}}
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

{{- define "hpad.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* selector labels of one component: (dict "root" $ "component" "scorer") */}}
{{- define "hpad.selectorLabels" -}}
app.kubernetes.io/name: {{ include "hpad.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* all labels of one component: (dict "root" $ "component" "scorer") */}}
{{- define "hpad.labels" -}}
helm.sh/chart: {{ include "hpad.chart" .root }}
{{ include "hpad.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: hpad
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "hpad.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "hpad.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* image of a component: (dict "root" $ "gpu" true) -> repository:tag[@digest]; the tag defaults to
     <appVersion>-cuda or <appVersion>-cpu (the two targets of deploy/docker/Dockerfile) */}}
{{- define "hpad.image" -}}
{{- $img := .root.Values.image }}
{{- $tag := default (printf "%s-%s" .root.Chart.AppVersion (ternary "cuda" "cpu" .gpu)) $img.tag }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository $tag }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- settings -> HPAD_* values */}}

{{/* one value as the settings read it: lists comma-separated, whole numbers without exponent, booleans true/false */}}
{{- define "hpad.envValue" -}}
{{- if kindIs "slice" . -}}
{{- join "," . -}}
{{- else if kindIs "float64" . -}}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else -}}
{{- . -}}
{{- end -}}
{{- end }}

{{/* precision of a component: explicit, or fp16 on GPU and fp32 on CPU */}}
{{- define "hpad.precision" -}}
{{- default (ternary "fp16" "fp32" .gpu.enabled) .precision }}
{{- end }}

{{/* broker address and security of every hpad client (the topics Job too); file paths only: secrets
     come from secretKeyRef env entries */}}
{{- define "hpad.kafkaSettings" -}}
{{- $k := .Values.kafka }}
HPAD_BOOTSTRAP_SERVERS: {{ $k.bootstrapServers | quote }}
HPAD_SECURITY_PROTOCOL: {{ $k.securityProtocol | quote }}
HPAD_REQUEST_TIMEOUT_MS: {{ include "hpad.envValue" $k.requestTimeoutMs | quote }}
{{- if include "hpad.tls" . }}
HPAD_SSL_CHECK_HOSTNAME: {{ include "hpad.envValue" $k.tls.checkHostname | quote }}
{{- end }}
{{- if $k.tls.ca.secretName }}
HPAD_SSL_CAFILE: {{ printf "%s/ca.crt" $k.tls.mountPath | quote }}
{{- end }}
{{- if $k.tls.client.secretName }}
HPAD_SSL_CERTFILE: {{ printf "%s/client.crt" $k.tls.mountPath | quote }}
HPAD_SSL_KEYFILE: {{ printf "%s/client.key" $k.tls.mountPath | quote }}
{{- end }}
{{- if $k.sasl.mechanism }}
HPAD_SASL_MECHANISM: {{ $k.sasl.mechanism | quote }}
{{- end }}
{{- end }}

{{/* ConfigMap data shared by scorer and tuner: broker, model, weights, LAA, categories, shared topics.
     They must agree: prompt artifacts name their model and LAA, and scorers refuse others. */}}
{{- define "hpad.sharedSettings" -}}
{{ include "hpad.kafkaSettings" . }}
HPAD_MODEL: {{ .Values.model.name | quote }}
{{- $w := .Values.model.weights }}
{{- if eq $w.source "pretrained" }}
HPAD_PRETRAINED: {{ $w.pretrained | quote }}
HPAD_CACHE_DIR: {{ $w.volume.mountPath | quote }}
HPAD_ALLOW_DOWNLOAD: {{ include "hpad.envValue" $w.allowDownload | quote }}
{{- else if eq $w.source "checkpoint" }}
HPAD_CHECKPOINT: {{ printf "%s/%s" $w.volume.mountPath $w.checkpoint | quote }}
{{- else }}
HPAD_RANDOM_INIT: "true"
{{- end }}
HPAD_LAA: {{ include "hpad.envValue" .Values.model.laa.enabled | quote }}
HPAD_LAA_LAYERS: {{ include "hpad.envValue" .Values.model.laa.layers | quote }}
HPAD_LAA_RADIUS: {{ include "hpad.envValue" .Values.model.laa.radius | quote }}
HPAD_CATEGORIES: {{ include "hpad.envValue" .Values.categories | quote }}
HPAD_NORMALS_TOPIC: {{ .Values.topics.normals.name | quote }}
HPAD_PROMPTS_TOPIC: {{ .Values.topics.prompts.name | quote }}
HPAD_METRICS_HOST: "0.0.0.0"
{{- end }}

{{/* free-form settings of a component (`scorer.config` / `tuner.config`), by settings field name */}}
{{- define "hpad.extraSettings" -}}
{{- range $key, $value := . }}
{{- if not (kindIs "invalid" $value) }}
HPAD_{{ upper $key }}: {{ include "hpad.envValue" $value | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* non-empty when the protocol uses TLS */}}
{{- define "hpad.tls" -}}
{{- if has .Values.kafka.securityProtocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{/* ---------------------------------------------------------------- pod pieces */}}

{{/* env entries from secrets: SASL user name and password, TLS key password */}}
{{- define "hpad.secretEnv" -}}
{{- $k := .Values.kafka }}
{{- if $k.sasl.mechanism }}
- name: HPAD_SASL_PLAIN_USERNAME
  {{- if $k.sasl.usernameKey }}
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.secretName | quote }}
      key: {{ $k.sasl.usernameKey | quote }}
  {{- else }}
  value: {{ $k.sasl.username | quote }}
  {{- end }}
- name: HPAD_SASL_PLAIN_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.sasl.secretName | quote }}
      key: {{ $k.sasl.passwordKey | quote }}
{{- end }}
{{- if and $k.tls.client.secretName $k.tls.client.passwordKey }}
- name: HPAD_SSL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $k.tls.client.secretName | quote }}
      key: {{ $k.tls.client.passwordKey | quote }}
{{- end }}
{{- end }}

{{/* environment that is not a setting: caches on the writable /tmp (the root filesystem is read-only) */}}
{{- define "hpad.runtimeEnv" -}}
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
- name: HF_HOME
  value: /tmp/.cache/huggingface
- name: TORCH_HOME
  value: /tmp/.cache/torch
{{- end }}

{{- define "hpad.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- $w := .Values.model.weights }}
{{- if and (ne $w.source "random") (ne $w.volume.type "image") }}
- name: weights
  mountPath: {{ $w.volume.mountPath | quote }}
  {{- with $w.volume.subPath }}
  subPath: {{ . | quote }}
  {{- end }}
  readOnly: {{ not $w.allowDownload }}
{{- end }}
{{- if or .Values.kafka.tls.ca.secretName .Values.kafka.tls.client.secretName }}
- name: kafka-tls
  mountPath: {{ .Values.kafka.tls.mountPath | quote }}
  readOnly: true
{{- end }}
{{- end }}

{{- define "hpad.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit | quote }}
{{- $w := .Values.model.weights }}
{{- if and (ne $w.source "random") (ne $w.volume.type "image") }}
- name: weights
  {{- if eq $w.volume.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ $w.volume.claimName | quote }}
    readOnly: {{ not $w.allowDownload }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ $w.volume.sizeLimit | quote }}
  {{- end }}
{{- end }}
{{- $tls := .Values.kafka.tls }}
{{- if or $tls.ca.secretName $tls.client.secretName }}
- name: kafka-tls
  projected:
    defaultMode: 0440
    sources:
      {{- if $tls.ca.secretName }}
      - secret:
          name: {{ $tls.ca.secretName | quote }}
          items:
            - key: {{ $tls.ca.key | quote }}
              path: ca.crt
      {{- end }}
      {{- if $tls.client.secretName }}
      - secret:
          name: {{ $tls.client.secretName | quote }}
          items:
            - key: {{ $tls.client.certKey | quote }}
              path: client.crt
            - key: {{ $tls.client.keyKey | quote }}
              path: client.key
      {{- end }}
{{- end }}
{{- end }}

{{/* GPU resources, node selector and toleration of a component: (dict "gpu" .Values.scorer.gpu "resources" ...) */}}
{{- define "hpad.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if .gpu.enabled }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits .gpu.resourceName (int .gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{- define "hpad.nodeSelector" -}}
{{- $sel := deepCopy (default dict .nodeSelector) }}
{{- if .gpu.enabled }}
{{- $sel = merge $sel (default dict .gpu.nodeSelector) }}
{{- end }}
{{- if $sel }}
{{- toYaml $sel }}
{{- end }}
{{- end }}

{{- define "hpad.tolerations" -}}
{{- $tol := default list .tolerations }}
{{- if .gpu.enabled }}
{{- $tol = append $tol (dict "key" .gpu.resourceName "operator" "Exists" "effect" "NoSchedule") }}
{{- end }}
{{- if $tol }}
{{- toYaml $tol }}
{{- end }}
{{- end }}

{{/* ---------------------------------------------------------------- scorer workers */}}

{{/* name of the metrics port of scorer worker i (HPAD_WORKERS): `metrics` for worker 0, `metrics-<i>` after it */}}
{{- define "hpad.metricsPortName" -}}
{{- if eq (int .) 0 }}metrics{{ else }}metrics-{{ . }}{{ end }}
{{- end }}

{{/* a probe of the scorer: (dict "root" $ "path" "/healthz" "probe" <timings>). One worker: httpGet on port
     `metrics`. Several: every worker must answer on its own port, checked by the image's python (stdlib only) */}}
{{- define "hpad.scorerProbe" -}}
{{- $s := .root.Values.scorer }}
{{- if le (int $s.workersPerGpu) 1 }}
httpGet:
  path: {{ .path }}
  port: metrics
{{- else }}
exec:
  command:
    - python
    - -c
    - {{ include "hpad.probeScript" . | quote }}
    - {{ .path | quote }}
    {{- range $i := until (int $s.workersPerGpu) }}
    - {{ add (int $s.metricsPort) $i | quote }}
    {{- end }}
{{- end }}
{{ toYaml .probe }}
{{- end }}

{{- define "hpad.probeScript" -}}
import sys, urllib.request
bad = []
for port in sys.argv[2:]:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}{sys.argv[1]}", timeout=2).close()
    except Exception as exc:
        bad.append(f"worker on port {port}: {exc}")
sys.exit("; ".join(bad) or None)
{{- end }}

{{/* ---------------------------------------------------------------- checks (fail early, at render) */}}

{{- define "hpad.validate" -}}
{{- $k := .Values.kafka }}
{{- $sasl := has $k.securityProtocol (list "SASL_PLAINTEXT" "SASL_SSL") }}
{{- if and $sasl (not $k.sasl.mechanism) }}
{{- fail (printf "kafka.securityProtocol=%s needs kafka.sasl.mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)" $k.securityProtocol) }}
{{- end }}
{{- if and $k.sasl.mechanism (not $sasl) }}
{{- fail "kafka.sasl.mechanism is set but kafka.securityProtocol is not SASL_PLAINTEXT or SASL_SSL" }}
{{- end }}
{{- if and $sasl (not $k.sasl.secretName) }}
{{- fail "SASL needs kafka.sasl.secretName (a secret with the password; the user name from usernameKey or kafka.sasl.username)" }}
{{- end }}
{{- if and $sasl (not $k.sasl.usernameKey) (not $k.sasl.username) }}
{{- fail "SASL needs kafka.sasl.usernameKey (a key of kafka.sasl.secretName) or kafka.sasl.username" }}
{{- end }}
{{- if and (or $k.tls.ca.secretName $k.tls.client.secretName) (not (include "hpad.tls" .)) }}
{{- fail "kafka.tls secrets are set but kafka.securityProtocol is not SSL or SASL_SSL" }}
{{- end }}
{{- $w := .Values.model.weights }}
{{- if and (eq $w.source "checkpoint") (not $w.checkpoint) }}
{{- fail "model.weights.source=checkpoint needs model.weights.checkpoint (the file name inside the weights volume)" }}
{{- end }}
{{- if and (eq $w.volume.type "pvc") (not $w.volume.claimName) (ne $w.source "random") }}
{{- fail "model.weights.volume.type=pvc needs model.weights.volume.claimName" }}
{{- end }}
{{- if and $w.allowDownload (ne $w.source "pretrained") }}
{{- fail "model.weights.allowDownload only applies to model.weights.source=pretrained" }}
{{- end }}
{{- if and $w.allowDownload (eq $w.volume.type "image") }}
{{- fail "model.weights.allowDownload needs a writable cache: model.weights.volume.type emptyDir or pvc (the image's cache dir is read-only)" }}
{{- end }}
{{- if and (eq $w.volume.type "emptyDir") (eq $w.source "pretrained") (not $w.allowDownload) }}
{{- fail "model.weights.volume.type=emptyDir starts empty: set model.weights.allowDownload=true, or use type image or pvc" }}
{{- end }}
{{- if and (eq $w.volume.type "emptyDir") (eq $w.source "checkpoint") }}
{{- fail "model.weights.source=checkpoint needs the file on a volume: model.weights.volume.type pvc or image" }}
{{- end }}
{{- if and .Values.defaultCategory (not (has .Values.defaultCategory .Values.categories)) }}
{{- fail (printf "defaultCategory %q is not in categories %v" .Values.defaultCategory .Values.categories) }}
{{- end }}
{{- $s := .Values.scorer }}
{{- $workers := int $s.workersPerGpu }}
{{- $partitions := int .Values.topics.frames.partitions }}
{{- $times := ternary "" (printf " x scorer.workersPerGpu (%d)" $workers) (eq $workers 1) }}
{{- if .Values.keda.enabled }}
{{- if gt (mul (int .Values.keda.maxReplicaCount) $workers) $partitions }}
{{- fail (printf "keda.maxReplicaCount (%d)%s exceeds topics.frames.partitions (%d): a scorer worker owns whole partitions, extra ones would sit idle" (int .Values.keda.maxReplicaCount) $times $partitions) }}
{{- end }}
{{- if gt (int .Values.keda.minReplicaCount) (int .Values.keda.maxReplicaCount) }}
{{- fail "keda.minReplicaCount exceeds keda.maxReplicaCount" }}
{{- end }}
{{- else if gt (mul (int $s.replicaCount) $workers) $partitions }}
{{- fail (printf "scorer.replicaCount (%d)%s exceeds topics.frames.partitions (%d): extra scorer workers would sit idle (and never be ready)" (int $s.replicaCount) $times $partitions) }}
{{- end }}
{{- if gt (add (int $s.metricsPort) $workers -1) 65535 }}
{{- fail (printf "scorer.metricsPort (%d) + scorer.workersPerGpu (%d) - 1 exceeds 65535: the workers use consecutive ports" (int $s.metricsPort) $workers) }}
{{- end }}
{{- if and $s.gpu.enabled (gt $workers 1) (gt (int $s.gpu.count) 1) }}
{{- fail (printf "scorer.workersPerGpu (%d) needs scorer.gpu.count 1: every worker of a pod runs on its first GPU (HPAD_DEVICE=cuda); use more replicas instead" $workers) }}
{{- end }}
{{- if and $s.gpu.enabled (gt (float64 $s.gpuMemoryGiB) 0.0) }}
{{- $need := mulf $workers $s.gpuMemoryPerWorkerGiB }}
{{- if gt (float64 $need) (float64 $s.gpuMemoryGiB) }}
{{- fail (printf "scorer.workersPerGpu (%d) x scorer.gpuMemoryPerWorkerGiB (%v) = %v GiB exceeds scorer.gpuMemoryGiB (%v): the workers would run out of GPU memory" $workers $s.gpuMemoryPerWorkerGiB $need $s.gpuMemoryGiB) }}
{{- end }}
{{- end }}
{{- if and .Values.tuner.enabled .Values.tuner.persistence.enabled (not .Values.tuner.persistence.existingClaim) (not .Values.tuner.persistence.size) }}
{{- fail "tuner.persistence.size is needed to create the reservoir claim" }}
{{- end }}
{{- end }}
