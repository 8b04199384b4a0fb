{{/*
Helpers of the kv-router chart. Each one says what it returns and what it expects.
Helpers that take a component are called with a dict: (dict "ctx" $ "component" "router").

The KVR_* environment variable names live in this file only: "kv-router.router.settings",
"kv-router.listener.settings" and "kv-router.secretEnv". Rename a setting here and every
manifest follows.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "kv-router.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The resource name prefix: fullnameOverride, or <release>-<chart> (just <release> when the
release name already contains the chart name). Truncated to 63 - 9 characters so that the
longest suffix ("-listener") still fits a DNS label.
*/}}
{{- define "kv-router.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 54 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* chart-version, for the helm.sh/chart label. */}}
{{- define "kv-router.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels every resource carries. Expects (dict "ctx" $ "component" "router"|...). */}}
{{- define "kv-router.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "kv-router.chart" $ctx }}
{{ include "kv-router.selectorLabels" . }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
app.kubernetes.io/part-of: kv-router
{{- with $ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The immutable subset of the labels that selectors use. Same dict as kv-router.labels. */}}
{{- define "kv-router.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kv-router.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* commonAnnotations as a YAML map body, or nothing. Expects the root context. */}}
{{- define "kv-router.annotations" -}}
{{- with .Values.commonAnnotations }}
{{- toYaml . }}
{{- end }}
{{- end -}}

{{/* A full image reference from {registry, repository, tag, digest}. Expects (dict "image" ... "default" tag). */}}
{{- define "kv-router.imageRef" -}}
{{- $img := .image -}}
{{- $repo := $img.repository -}}
{{- if $img.registry }}{{ $repo = printf "%s/%s" $img.registry $img.repository }}{{ end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (toString (default .default $img.tag)) -}}
{{- end -}}
{{- end -}}

{{/* The kvrouter image (tag defaults to the chart's appVersion). Expects the root context. */}}
{{- define "kv-router.image" -}}
{{- include "kv-router.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end -}}

{{/* The ServiceAccount the router and listener run as. Expects the root context. */}}
{{- define "kv-router.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kv-router.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether pods need a service-account token: only Kubernetes discovery talks to the API. */}}
{{- define "kv-router.needsApiAccess" -}}
{{- if eq .Values.discovery.mode "kubernetes" }}true{{ end -}}
{{- end -}}

{{/* Namespace of the watched EndpointSlices. Expects the root context. */}}
{{- define "kv-router.discovery.namespace" -}}
{{- default .Release.Namespace .Values.discovery.kubernetes.namespace -}}
{{- end -}}

{{/* Name of the Secret the chart creates (admin token, Redis password). */}}
{{- define "kv-router.secretName" -}}
{{- include "kv-router.fullname" . -}}
{{- end -}}

{{/*
A secret value that stays the same across upgrades: `value` when given, else the value
already stored in the chart's Secret under `key` (lookup; empty under `helm template`), else
32 random characters. Expects (dict "ctx" $ "key" "admin-token" "value" "...").
*/}}
{{- define "kv-router.secretValue" -}}
{{- if .value -}}
{{- .value -}}
{{- else -}}
{{- $existing := lookup "v1" "Secret" .ctx.Release.Namespace (include "kv-router.secretName" .ctx) -}}
{{- if and $existing (index ($existing.data | default dict) .key) -}}
{{- index $existing.data .key | b64dec -}}
{{- else -}}
{{- randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Whether the chart's own Secret holds anything (and so is rendered). */}}
{{- define "kv-router.createSecret" -}}
{{- if or (not .Values.auth.existingSecret) (eq (include "kv-router.redis.passwordFromChart" .) "true") }}true{{ end -}}
{{- end -}}

{{/* "true" when the Redis password comes from the chart's own Secret. */}}
{{- define "kv-router.redis.passwordFromChart" -}}
{{- if .Values.redis.enabled -}}
{{- if and .Values.redis.auth.enabled (not .Values.redis.auth.existingSecret) }}true{{ end -}}
{{- else -}}
{{- if and .Values.externalRedis.password (not .Values.externalRedis.existingSecret) }}true{{ end -}}
{{- end -}}
{{- end -}}

{{/* Secret name and key of the Redis password, as "name/key", or empty when there is none. */}}
{{- define "kv-router.redis.passwordRef" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.enabled -}}
{{- if .Values.redis.auth.existingSecret -}}
{{- printf "%s/%s" .Values.redis.auth.existingSecret .Values.redis.auth.existingSecretPasswordKey -}}
{{- else -}}
{{- printf "%s/%s" (include "kv-router.secretName" .) "redis-password" -}}
{{- end -}}
{{- end -}}
{{- else if .Values.externalRedis.existingSecret -}}
{{- printf "%s/%s" .Values.externalRedis.existingSecret .Values.externalRedis.existingSecretPasswordKey -}}
{{- else if .Values.externalRedis.password -}}
{{- printf "%s/%s" (include "kv-router.secretName" .) "redis-password" -}}
{{- end -}}
{{- end -}}

{{/* Secret name and key of the admin token, as "name/key". */}}
{{- define "kv-router.adminTokenRef" -}}
{{- if .Values.auth.existingSecret -}}
{{- printf "%s/%s" .Values.auth.existingSecret .Values.auth.existingSecretAdminTokenKey -}}
{{- else -}}
{{- printf "%s/%s" (include "kv-router.secretName" .) "admin-token" -}}
{{- end -}}
{{- end -}}

{{/* Name of the bundled Redis StatefulSet and Service. */}}
{{- define "kv-router.redis.fullname" -}}
{{- printf "%s-redis" (include "kv-router.fullname" .) -}}
{{- end -}}

{{/*
KVR_REDIS_URL. Bundled Redis: its Service. External: externalRedis.url, plus the TLS file
options (ssl_ca_certs, ssl_certfile, ssl_keyfile) pointing at the mounted Secret when
externalRedis.tls.enabled. The password is never in the URL: KVR_REDIS_PASSWORD carries it.
*/}}
{{- define "kv-router.redis.url" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:%v/0" (include "kv-router.redis.fullname" .) .Release.Namespace .Values.redis.service.port -}}
{{- else -}}
{{- $url := .Values.externalRedis.url -}}
{{- $tls := .Values.externalRedis.tls -}}
{{- if $tls.enabled -}}
{{- $opts := list (printf "ssl_ca_certs=%s/%s" $tls.mountPath $tls.caFilename) -}}
{{- if $tls.clientCert -}}
{{- $opts = append $opts (printf "ssl_certfile=%s/%s" $tls.mountPath $tls.certFilename) -}}
{{- $opts = append $opts (printf "ssl_keyfile=%s/%s" $tls.mountPath $tls.keyFilename) -}}
{{- end -}}
{{- $url = printf "%s%s%s" $url (ternary "&" "?" (contains "?" $url)) (join "&" $opts) -}}
{{- end -}}
{{- $url -}}
{{- end -}}
{{- end -}}

{{/* KVR_TOKENIZER: the mount path for mounted sources, tokenizer.path for `none`. */}}
{{- define "kv-router.tokenizer.path" -}}
{{- if eq .Values.tokenizer.source "none" -}}
{{- .Values.tokenizer.path -}}
{{- else -}}
{{- .Values.tokenizer.mountPath -}}
{{- end -}}
{{- end -}}

{{/* Name of the tokenizer ConfigMap: the given one, or the chart's for inline files. */}}
{{- define "kv-router.tokenizer.configMapName" -}}
{{- default (printf "%s-tokenizer" (include "kv-router.fullname" .)) .Values.tokenizer.configMap.name -}}
{{- end -}}

{{/* KVR_K8S_* settings shared by both roles (nothing unless discovery.mode is kubernetes). */}}
{{- define "kv-router.discovery.settings" -}}
KVR_DISCOVERY: {{ .Values.discovery.mode | quote }}
{{- if eq .Values.discovery.mode "kubernetes" }}
KVR_K8S_NAMESPACE: {{ include "kv-router.discovery.namespace" . | quote }}
KVR_K8S_SELECTOR: {{ .Values.discovery.kubernetes.selector | quote }}
KVR_K8S_HTTP_PORT_NAME: {{ .Values.discovery.kubernetes.httpPortName | quote }}
{{- end }}
{{- end -}}

{{/* Settings both roles share: Redis and key prefix. */}}
{{- define "kv-router.common.settings" -}}
KVR_REDIS_URL: {{ include "kv-router.redis.url" . | quote }}
KVR_KEY_PREFIX: {{ .Values.config.keyPrefix | quote }}
{{- end -}}

{{/* The model settings of one process: KVR_MODEL, block size and hash seed. Expects a model
     of "kv-router.listenerModels". */}}
{{- define "kv-router.model.settings" -}}
KVR_MODEL: {{ .name | quote }}
KVR_BLOCK_SIZE: {{ .blockSize | toString | quote }}
{{- if ne (toString .hashSeed) "" }}
KVR_HASH_SEED: {{ .hashSeed | toString | quote }}
{{- end }}
{{- end -}}

{{/* The base models, one listener each, as a JSON list of {id, suffix, name, blockSize,
     hashSeed, selector, engines}: `config.model` alone (suffix "", the names of a one-model
     install) or every entry of `config.models`. */}}
{{- define "kv-router.listenerModels" -}}
{{- $out := list -}}
{{- if .Values.config.models -}}
{{- range .Values.config.models -}}
{{- $id := .id | default (regexReplaceAll "[^a-z0-9]+" (lower (last (splitList "/" .name))) "-" | trunc 20 | trimAll "-") -}}
{{- $out = append $out (dict "id" $id "suffix" (printf "-%s" $id) "name" .name
      "blockSize" (.blockSize | default $.Values.config.blockSize)
      "hashSeed" (hasKey . "hashSeed" | ternary .hashSeed $.Values.config.hashSeed)
      "selector" (.selector | default "") "engines" (.engines | default list)) -}}
{{- end -}}
{{- else -}}
{{- $out = append $out (dict "id" "" "suffix" "" "name" .Values.config.model
      "blockSize" .Values.config.blockSize "hashSeed" .Values.config.hashSeed "selector" ""
      "engines" .Values.discovery.static.engines) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

{{/* The base models' names, as a JSON list. */}}
{{- define "kv-router.modelNames" -}}
{{- $names := list -}}
{{- range (include "kv-router.listenerModels" . | fromJsonArray) }}{{ $names = append $names .name }}{{ end -}}
{{- toJson $names -}}
{{- end -}}

{{/* The router's --config file (YAML) for `config.models`: each model with its own block
     size, hash seed and tokenizer, adapters under their base. */}}
{{- define "kv-router.router.modelsFile" -}}
models:
{{- range .Values.config.models }}
  - name: {{ .name | quote }}
    block_size: {{ .blockSize | default $.Values.config.blockSize }}
    {{- $seed := hasKey . "hashSeed" | ternary .hashSeed $.Values.config.hashSeed }}
    {{- if ne (toString $seed) "" }}
    hash_seed: {{ $seed | toString | quote }}
    {{- end }}
    {{- with .tokenizer }}
    tokenizer: {{ . | quote }}
    {{- end }}
{{- end }}
{{- range $m := .Values.config.models }}
{{- range .adapters }}
  - name: {{ .name | quote }}
    parent: {{ $m.name | quote }}
    {{- with .loraPath }}
    lora_path: {{ . | quote }}
    {{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The router's ConfigMap data: every non-secret KVR_* setting of `kvrouter serve`. */}}
{{- define "kv-router.router.settings" -}}
KVR_HOST: "0.0.0.0"
KVR_PORT: {{ .Values.router.containerPort | quote }}
{{ include "kv-router.common.settings" . }}
{{- if .Values.config.models }}
KVR_CONFIG: "/etc/kvrouter/models.yaml"
KVR_BLOCK_SIZE: {{ .Values.config.blockSize | quote }}
{{- else }}
{{ include "kv-router.model.settings" (first (include "kv-router.listenerModels" . | fromJsonArray)) }}
{{- end }}
KVR_POLICY: {{ .Values.router.policy | quote }}
{{- $kvEvents := .Values.router.kvEvents }}
{{- if eq (toString $kvEvents) "auto" }}{{ $kvEvents = .Values.listener.enabled }}{{ end }}
KVR_KV_EVENTS: {{ $kvEvents | toString | quote }}
KVR_PD_MIN_PREFILL_TOKENS: {{ .Values.router.disaggregation.minPrefillTokens | int64 | toString | quote }}
KVR_PD_SATURATION_TOKENS: {{ .Values.router.disaggregation.saturationTokens | int64 | toString | quote }}
KVR_PD_TRANSFER_WEIGHT: {{ .Values.router.disaggregation.transferWeight | toString | quote }}
{{- with include "kv-router.tokenizer.path" . }}
KVR_TOKENIZER: {{ . | quote }}
{{- end }}
{{ include "kv-router.discovery.settings" . }}
{{- if eq .Values.discovery.mode "static" }}
KVR_WORKERS: {{ join "," .Values.discovery.static.workers | quote }}
{{- end }}
{{- end -}}

{{/* A listener's ConfigMap data: every non-secret KVR_* setting of `kvrouter listen`.
     Expects (dict "ctx" $ "m" <a model of "kv-router.listenerModels">): each listener serves
     one base model, its engines narrowed by the model's selector. */}}
{{- define "kv-router.listener.settings" -}}
{{- $ctx := .ctx -}}
{{ include "kv-router.common.settings" $ctx }}
{{ include "kv-router.model.settings" .m }}
KVR_METRICS_PORT: {{ $ctx.Values.listener.metricsPort | quote }}
{{ include "kv-router.discovery.settings" $ctx }}
{{- if eq $ctx.Values.discovery.mode "kubernetes" }}
{{- if .m.selector }}
KVR_K8S_SELECTOR: {{ printf "%s,%s" $ctx.Values.discovery.kubernetes.selector .m.selector | quote }}
{{- end }}
KVR_K8S_EVENTS_PORT_NAME: {{ $ctx.Values.discovery.kubernetes.eventsPortName | quote }}
KVR_K8S_REPLAY_PORT_NAME: {{ $ctx.Values.discovery.kubernetes.replayPortName | quote }}
{{- end }}
{{- if eq $ctx.Values.discovery.mode "static" }}
KVR_ENGINES: {{ join "," .m.engines | quote }}
{{- end }}
{{- end -}}

{{/* Secret-backed env vars. Expects (dict "ctx" $ "admin" true|false). */}}
{{- define "kv-router.secretEnv" -}}
{{- $ctx := .ctx -}}
{{- with include "kv-router.redis.passwordRef" $ctx }}
{{- $ref := splitList "/" . }}
- name: KVR_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ index $ref 0 }}
      key: {{ index $ref 1 }}
{{- end }}
{{- if .admin }}
{{- $ref := splitList "/" (include "kv-router.adminTokenRef" $ctx) }}
- name: KVR_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ index $ref 0 }}
      key: {{ index $ref 1 }}
{{- end }}
{{- end -}}

{{/* Volumes for external Redis TLS files, or nothing. Expects the root context. */}}
{{- define "kv-router.redisTls.volumes" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls.enabled }}
- name: redis-tls
  secret:
    secretName: {{ .Values.externalRedis.tls.existingSecret }}
    defaultMode: 0440
{{- end }}
{{- end -}}

{{/* Volume mounts for external Redis TLS files, or nothing. */}}
{{- define "kv-router.redisTls.volumeMounts" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.tls.enabled }}
- name: redis-tls
  mountPath: {{ .Values.externalRedis.tls.mountPath }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* The router's tokenizer volume, or nothing (source none). */}}
{{- define "kv-router.tokenizer.volumes" -}}
{{- $t := .Values.tokenizer -}}
{{- if eq $t.source "configMap" }}
- name: tokenizer
  configMap:
    name: {{ include "kv-router.tokenizer.configMapName" . }}
{{- else if eq $t.source "volume" }}
- name: tokenizer
  {{- toYaml $t.volume | nindent 2 }}
{{- else if eq $t.source "initContainer" }}
- name: tokenizer
  emptyDir:
    sizeLimit: 256Mi
{{- end }}
{{- end -}}

{{/* The router's tokenizer mount, or nothing. */}}
{{- define "kv-router.tokenizer.volumeMounts" -}}
{{- $t := .Values.tokenizer -}}
{{- if ne $t.source "none" }}
- name: tokenizer
  mountPath: {{ $t.mountPath }}
  readOnly: true
  {{- with $t.subPath }}
  subPath: {{ . }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
Cross-field checks JSON Schema cannot express; rendered at the top of the router
Deployment so that any install or template fails with the reason.
*/}}
{{- define "kv-router.validate" -}}
{{- /* Required values, with an example (the schema lets them be empty so this message, not
       a raw schema error, is what a first install shows). */ -}}
{{- if not (or .Values.config.model .Values.config.models) -}}
{{- fail "values: /config/model is required: the model name vLLM serves (its --served-model-name), e.g. --set config.model=meta-llama/Llama-3.1-8B-Instruct (see helm/kv-router/examples/minimal.yaml; several models: config.models, examples/two-models.yaml)" -}}
{{- end -}}
{{- if and .Values.config.model .Values.config.models -}}
{{- fail "values: /config/model and /config/models are exclusive: list every model under config.models (see helm/kv-router/examples/two-models.yaml)" -}}
{{- end -}}
{{- $ids := list -}}
{{- range (include "kv-router.listenerModels" . | fromJsonArray) -}}
{{- if has .id $ids -}}
{{- fail (printf "values: /config/models: two models have the listener id %q: give one an `id`" .id) -}}
{{- end -}}
{{- $ids = append $ids .id -}}
{{- end -}}
{{- if and (eq .Values.discovery.mode "kubernetes") (not .Values.discovery.kubernetes.selector) -}}
{{- fail "values: /discovery/kubernetes/selector is required with discovery.mode=kubernetes: the label selector of the vLLM Service's EndpointSlices, e.g. --set discovery.kubernetes.selector=kubernetes.io/service-name=vllm" -}}
{{- end -}}
{{- $a := .Values.router.autoscaling -}}
{{- if and $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- fail (printf "router.autoscaling.minReplicas (%v) must not exceed maxReplicas (%v)" $a.minReplicas $a.maxReplicas) -}}
{{- end -}}
{{- $engines := .Values.discovery.static.engines -}}
{{- range .Values.config.models }}{{ $engines = concat $engines (.engines | default list) }}{{ end -}}
{{- if and .Values.config.models .Values.discovery.static.engines -}}
{{- fail "values: /discovery/static/engines: with config.models each model lists its own engines (config.models[].engines), so each listener gets its model's" -}}
{{- end -}}
{{- range $engines -}}
{{- if not (regexMatch "^[^=,#\\s]+=[a-z]+://[^,\\s]+(,(replay|dp|topic|block|bind)=[^,\\s]*)*$" .) -}}
{{- fail (printf "values: /discovery/static/engines: %q is not ID=tcp://HOST:PORT[,replay=tcp://HOST:PORT][,dp=N][,topic=T][,block=B]: every engine needs the worker id the router knows it by, e.g. vllm-0=tcp://10.0.0.1:5557,replay=tcp://10.0.0.1:5558" .) -}}
{{- end -}}
{{- end -}}
{{- if and (eq .Values.discovery.mode "kubernetes") (not .Values.rbac.create) (not .Values.serviceAccount.name) -}}
{{- fail "discovery.mode=kubernetes with rbac.create=false needs serviceAccount.name: an account that may get/list/watch endpointslices" -}}
{{- end -}}
{{- end -}}

{{/*
Checksum of the secret *settings* (values, Secret names and keys) for pod annotations. Not
of the rendered Secret: a generated value is different on every `helm template`, and would
roll every pod on every GitOps sync. A changed password or Secret name still rolls them.
*/}}
{{- define "kv-router.secretChecksum" -}}
{{- toJson (list .Values.auth .Values.redis.enabled .Values.redis.auth .Values.externalRedis) | sha256sum -}}
{{- end -}}

{{/* The endpoint picker's Service (what an InferencePool's endpointPickerRef names). */}}
{{- define "kv-router.epp.serviceName" -}}
{{- printf "%s-epp" (include "kv-router.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The InferencePool the picker watches: the one the chart creates, or an existing one; empty
when neither (the picker then uses `discovery`). */}}
{{- define "kv-router.epp.poolName" -}}
{{- $p := .Values.epp.inferencePool -}}
{{- if $p.create -}}{{ default (include "kv-router.fullname" .) $p.name }}{{- else -}}{{ $p.name }}{{- end -}}
{{- end -}}
