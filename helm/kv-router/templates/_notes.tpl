{{/* The text of NOTES.txt, a helper so that tests can render it without a cluster. Expects the root context. */}}
{{- define "kv-router.notes" -}}
{{- $fullname := include "kv-router.fullname" . -}}
{{- $ns := .Release.Namespace -}}
{{- $port := .Values.router.service.port -}}
{{- $prefix := .Values.config.keyPrefix -}}
{{- $models := include "kv-router.modelNames" . | fromJsonArray -}}
{{- $model := first $models -}}
kv-router {{ .Chart.AppVersion }} is installed as release "{{ .Release.Name }}" in namespace "{{ $ns }}".
Model{{ if gt (len $models) 1 }}s{{ end }} "{{ join "\", \"" $models }}", policy "{{ .Values.router.policy }}", block size {{ .Values.config.blockSize }} (must equal vLLM's --block-size).
{{- if and (eq .Values.tokenizer.source "none") (not .Values.tokenizer.path) }}

WARNING: no tokenizer (tokenizer.source is "none" and tokenizer.path is empty). Chat and text
requests are routed by load only; only pre-tokenized prompts use the KV-cache index. Give the
router the model's tokenizer.json (tokenizer.source: configMap, volume or initContainer).
{{- end }}

1. Reach the router (OpenAI-compatible API)

   Inside the cluster:  http://{{ $fullname }}.{{ $ns }}.svc:{{ $port }}/v1
{{- if eq .Values.router.service.type "LoadBalancer" }}
   From outside (the address can take a minute to appear):
     export ROUTER_HOST=$(kubectl get svc -n {{ $ns }} {{ $fullname }} -o jsonpath='{.status.loadBalancer.ingress[0].ip}{.status.loadBalancer.ingress[0].hostname}')
     curl http://$ROUTER_HOST:{{ $port }}/v1/models
{{- else }}
   From your machine:
     kubectl port-forward -n {{ $ns }} svc/{{ $fullname }} {{ $port }}:{{ $port }}
     curl http://127.0.0.1:{{ $port }}/v1/models
{{- end }}
     curl http://127.0.0.1:{{ $port }}/v1/completions -H 'Content-Type: application/json' \
       -d '{"model": "{{ $model }}", "prompt": "Hello", "max_tokens": 8}'

   The admin token (header "Authorization: Bearer <token>" on admin endpoints):
{{- $tok := splitList "/" (include "kv-router.adminTokenRef" .) }}
     kubectl get secret -n {{ $ns }} {{ index $tok 0 }} -o jsonpath='{.data.{{ index $tok 1 }}}' | base64 -d

2. Check the workers it found
{{- if eq .Values.discovery.mode "kubernetes" }}
   Discovery watches the EndpointSlices selected by "{{ .Values.discovery.kubernetes.selector }}"
   in namespace "{{ include "kv-router.discovery.namespace" . }}". They should list your vLLM pods, ready:
     kubectl get endpointslices -n {{ include "kv-router.discovery.namespace" . }} -l '{{ .Values.discovery.kubernetes.selector }}' -o wide
   Worker ids are <pod name>:<http port> (with #dp<r> for data-parallel ranks r > 0).
{{- else if eq .Values.discovery.mode "static" }}
   Static workers: {{ join ", " .Values.discovery.static.workers }}
{{- else }}
   Workers register themselves in Redis ({{ $prefix }}:registry).
{{- end }}
   Routing counters and per-worker load:
     curl -s http://127.0.0.1:{{ $port }}/metrics | grep -v '^#'
   Router readiness (ready once some worker can take requests; without Redis it stays ready,
   "degraded", routing on local load: see "redis" in the body of /ready):
     kubectl get pods -n {{ $ns }} -l app.kubernetes.io/instance={{ .Release.Name }}
{{- if .Values.listener.enabled }}
   Listener (KV events -> index) metrics:
     kubectl port-forward -n {{ $ns }} svc/{{ $fullname }}-listener {{ .Values.listener.service.port }}:{{ .Values.listener.service.port }}
     curl -s http://127.0.0.1:{{ .Values.listener.service.port }}/metrics | grep -v '^#'
{{- end }}

3. Inspect the prefix-cache index in Redis (every key is readable; see docs/redis-schema.md)
{{- if .Values.redis.enabled }}
     kubectl exec -n {{ $ns }} statefulset/{{ include "kv-router.redis.fullname" . }} -- redis-cli --scan --pattern '{{ $prefix }}:*'
     kubectl exec -n {{ $ns }} statefulset/{{ include "kv-router.redis.fullname" . }} -- redis-cli ZRANGE '{{ $prefix }}:{ {{- $model -}} }:workers' 0 -1 WITHSCORES
     kubectl exec -n {{ $ns }} statefulset/{{ include "kv-router.redis.fullname" . }} -- redis-cli ZCARD '{{ $prefix }}:{ {{- $model -}} }:wrk:<worker id>'
   (REDISCLI_AUTH is set in the Redis container, so redis-cli authenticates by itself.)

   This Redis is a single node without replication, for trying kv-router out. In production
   set redis.enabled=false and externalRedis.url (Sentinel or Cluster).
{{- else }}
   From a throwaway pod (add -c for a Redis Cluster, --tls --cacert for TLS):
     kubectl run -n {{ $ns }} redis-cli --rm -it --restart=Never --image=redis:7.4 -- \
       redis-cli -h <redis host> -p <port> --user <user if any> --pass <password> --scan --pattern '{{ $prefix }}:*'
   The router and listener use: {{ include "kv-router.redis.url" . }}
{{- end }}
{{- end -}}
