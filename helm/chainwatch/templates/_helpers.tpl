{{/*
Chart name (app.kubernetes.io/name).
*/}}
{{- define "chainwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every object's name. Truncated at 63 characters because some
Kubernetes name fields are limited to this (by the DNS naming spec). If the release name
contains the chart name it is used as the full name.
*/}}
{{- define "chainwatch.fullname" -}}
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

{{/*
Chart name and version (helm.sh/chart).
*/}}
{{- define "chainwatch.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Namespace of the release's objects.
*/}}
{{- define "chainwatch.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels: name and instance only (stable across upgrades; selectors are immutable).
*/}}
{{- define "chainwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "chainwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Common labels of every object.
*/}}
{{- define "chainwatch.labels" -}}
helm.sh/chart: {{ include "chainwatch.chart" . }}
{{ include "chainwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ include "chainwatch.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/part-of: chainwatch
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
A component's selector labels: the selector labels plus app.kubernetes.io/component, so
the collector and detector Deployments never select each other's pods.
Call with (dict "root" $ "component" "collector").
*/}}
{{- define "chainwatch.componentSelectorLabels" -}}
{{ include "chainwatch.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
A component's labels. Call with (dict "root" $ "component" "collector").
*/}}
{{- define "chainwatch.componentLabels" -}}
{{ include "chainwatch.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
A component's object name. Call with (dict "root" $ "component" "collector").
*/}}
{{- define "chainwatch.componentName" -}}
{{- printf "%s-%s" (include "chainwatch.fullname" .root | trunc (int (sub 62 (len .component)))) .component | trimSuffix "-" }}
{{- end }}

{{/*
The components this release runs: a list of "collector", "detector", "all-in-one".
*/}}
{{- define "chainwatch.components" -}}
{{- $c := list }}
{{- if eq .Values.mode "all-in-one" }}
{{- $c = append $c "all-in-one" }}
{{- else }}
{{- if .Values.collector.enabled }}{{ $c = append $c "collector" }}{{ end }}
{{- if .Values.detector.enabled }}{{ $c = append $c "detector" }}{{ end }}
{{- end }}
{{- toJson $c }}
{{- end }}

{{/*
Whether this release runs a collector (collector Deployment or the all-in-one pod): "true" or "".
*/}}
{{- define "chainwatch.collects" -}}
{{- if or (eq .Values.mode "all-in-one") .Values.collector.enabled }}true{{ end }}
{{- end }}

{{/*
Whether this release talks to Kafka: "true" or "".
*/}}
{{- define "chainwatch.usesKafka" -}}
{{- if and (eq .Values.mode "distributed") (or .Values.collector.enabled .Values.detector.enabled) }}true{{ end }}
{{- end }}

{{/*
Image tag: image.tag, else the chart's appVersion.
*/}}
{{- define "chainwatch.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
Image reference: registry/repository:tag, or registry/repository@digest when a digest is set.
*/}}
{{- define "chainwatch.image" -}}
{{- $repo := .Values.image.repository }}
{{- if .Values.image.registry }}
{{- $repo = printf "%s/%s" .Values.image.registry .Values.image.repository }}
{{- end }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repo .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repo (include "chainwatch.imageTag" .) }}
{{- end }}
{{- end }}

{{/*
ServiceAccount name.
*/}}
{{- define "chainwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "chainwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Secret holding the node URLs.
*/}}
{{- define "chainwatch.rpcSecretName" -}}
{{- if .Values.rpc.existingSecret }}
{{- .Values.rpc.existingSecret }}
{{- else }}
{{- printf "%s-rpc" (include "chainwatch.fullname" .) }}
{{- end }}
{{- end }}

{{/*
Whether SASL is on: "true" or "".
*/}}
{{- define "chainwatch.sasl" -}}
{{- if hasPrefix "SASL_" .Values.kafka.securityProtocol }}true{{ end }}
{{- end }}

{{/*
Secret holding the Kafka SASL password, and its key.
*/}}
{{- define "chainwatch.kafkaSecretName" -}}
{{- if .Values.kafka.sasl.existingSecret }}
{{- .Values.kafka.sasl.existingSecret }}
{{- else }}
{{- printf "%s-kafka" (include "chainwatch.fullname" .) }}
{{- end }}
{{- end }}

{{- define "chainwatch.kafkaSecretKey" -}}
{{- if .Values.kafka.sasl.existingSecret }}
{{- .Values.kafka.sasl.existingSecretPasswordKey }}
{{- else -}}
password
{{- end }}
{{- end }}

{{/*
The Secret keys the nodes file refers to, sorted and without duplicates (JSON list).
*/}}
{{- define "chainwatch.rpcKeys" -}}
{{- $keys := list }}
{{- range .Values.nodes }}
{{- $keys = append $keys .rpcSecretKey }}
{{- if .wsSecretKey }}{{ $keys = append $keys .wsSecretKey }}{{ end }}
{{- end }}
{{- toJson ($keys | uniq | sortAlpha) }}
{{- end }}

{{/*
The nodes file (chainwatch/nodes.py's format). URLs are ${KEY} placeholders that chainwatch
expands from the environment; the environment gets them from the RPC Secret.
*/}}
{{- define "chainwatch.nodesFile" -}}
{{- $nodes := list }}
{{- range .Values.nodes }}
{{- $n := dict "name" .name "rpc" (printf "${%s}" .rpcSecretKey) }}
{{- if .wsSecretKey }}{{ $_ := set $n "ws" (printf "${%s}" .wsSecretKey) }}{{ end }}
{{- if hasKey . "expectedBlockTime" }}{{ $_ := set $n "expected_block_time" .expectedBlockTime }}{{ end }}
{{- if hasKey . "mempool" }}{{ $_ := set $n "mempool" .mempool }}{{ end }}
{{- if hasKey . "peers" }}{{ $_ := set $n "peers" .peers }}{{ end }}
{{- $nodes = append $nodes $n }}
{{- end }}
{{- toYaml (dict "nodes" $nodes) }}
{{- end }}

{{/*
Checks that the schema cannot express; each failure is one clear message.
*/}}
{{- define "chainwatch.validateValues" -}}
{{- $components := include "chainwatch.components" . | fromJsonArray }}
{{- if not $components }}
{{- fail "\nchainwatch: nothing to run: in distributed mode enable collector.enabled and/or detector.enabled" }}
{{- end }}
{{- if include "chainwatch.collects" . }}
{{- if not .Values.nodes }}
{{- fail "\nchainwatch: set `nodes`, the nodes to follow (each with name and rpcSecretKey), see the chart README" }}
{{- end }}
{{- $names := list }}
{{- range .Values.nodes }}
{{- if has .name $names }}
{{- fail (printf "\nchainwatch: nodes: duplicate node name %q" .name) }}
{{- end }}
{{- $names = append $names .name }}
{{- end }}
{{- if not .Values.rpc.existingSecret }}
{{- range (include "chainwatch.rpcKeys" . | fromJsonArray) }}
{{- if not (hasKey $.Values.rpc.urls .) }}
{{- fail (printf "\nchainwatch: nodes refer to Secret key %q: add it to rpc.urls, or set rpc.existingSecret to a Secret that has it" .) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "chainwatch.usesKafka" . }}
{{- if not .Values.kafka.bootstrapServers }}
{{- fail "\nchainwatch: distributed mode needs kafka.bootstrapServers (HOST:PORT[,HOST:PORT]), or set mode=all-in-one for the embedded bus" }}
{{- end }}
{{- if include "chainwatch.sasl" . }}
{{- if not .Values.kafka.sasl.mechanism }}
{{- fail (printf "\nchainwatch: kafka.securityProtocol %s needs kafka.sasl.mechanism (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if not .Values.kafka.sasl.username }}
{{- fail (printf "\nchainwatch: kafka.securityProtocol %s needs kafka.sasl.username" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if not (or .Values.kafka.sasl.password .Values.kafka.sasl.existingSecret) }}
{{- fail (printf "\nchainwatch: kafka.securityProtocol %s needs kafka.sasl.existingSecret (or kafka.sasl.password)" .Values.kafka.securityProtocol) }}
{{- end }}
{{- else if or .Values.kafka.sasl.mechanism .Values.kafka.sasl.password .Values.kafka.sasl.existingSecret }}
{{- fail (printf "\nchainwatch: kafka.sasl.* is set but kafka.securityProtocol is %s: use SASL_PLAINTEXT or SASL_SSL" .Values.kafka.securityProtocol) }}
{{- end }}
{{- if and .Values.kafka.tls.caSecret (not (hasSuffix "SSL" .Values.kafka.securityProtocol)) }}
{{- fail (printf "\nchainwatch: kafka.tls.caSecret is set but kafka.securityProtocol is %s: use SSL or SASL_SSL" .Values.kafka.securityProtocol) }}
{{- end }}
{{- end }}
{{- if .Values.prometheusRule.enabled }}
{{- $known := include "chainwatch.ruleNames" . | fromJson }}
{{- $all := concat $known.alerts $known.records }}
{{- range $name, $_ := .Values.prometheusRule.disabled }}
{{- if not (has $name $all) }}
{{- fail (printf "\nchainwatch: prometheusRule.disabled.%s: no rule of that name in the chart's files/rules (known: %s)" $name (join ", " $all)) }}
{{- end }}
{{- end }}
{{- range $name, $_ := .Values.prometheusRule.overrides }}
{{- if not (has $name $known.alerts) }}
{{- fail (printf "\nchainwatch: prometheusRule.overrides.%s: no alert of that name in the chart's files/rules (known: %s)" $name (join ", " $known.alerts)) }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
