{{/*
One chainwatch Deployment. Call with
  (dict "root" $ "component" "collector"|"detector"|"all-in-one" "values" <component values>)
collector:  `chainwatch collect`, 1 replica, Recreate (its checkpoints are local to the pod)
detector:   `chainwatch detect`, detector.replicaCount replicas in one consumer group
all-in-one: `chainwatch run` on the embedded bus, 1 replica, Recreate
*/}}
{{- define "chainwatch.deployment" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := .values }}
{{- $V := $root.Values }}
{{- $collects := ne $c "detector" }}
{{- $kafka := ne $c "all-in-one" }}
{{- $command := dict "collector" "collect" "detector" "detect" "all-in-one" "run" }}
{{- $ctx := dict "root" $root "component" $c }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "chainwatch.componentName" $ctx }}
  namespace: {{ include "chainwatch.namespace" $root }}
  labels:
    {{- include "chainwatch.componentLabels" $ctx | nindent 4 }}
spec:
  {{- if eq $c "detector" }}
  replicas: {{ $v.replicaCount }}
  {{- else }}
  replicas: 1
  strategy:
    type: Recreate
  {{- end }}
  revisionHistoryLimit: 10
  selector:
    matchLabels:
      {{- include "chainwatch.componentSelectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "chainwatch.componentLabels" $ctx | nindent 8 }}
        {{- with $v.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- /* no checksum of Secrets: a hash of a password in a pod annotation can be guessed offline */}}
      {{- $annotations := dict }}
      {{- if $collects }}
      {{- $_ := set $annotations "checksum/nodes" (include "chainwatch.nodesFile" $root | sha256sum) }}
      {{- end }}
      {{- $annotations = merge $annotations ($v.podAnnotations | default dict) }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "chainwatch.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $V.serviceAccount.automountServiceAccountToken }}
      {{- with $V.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      securityContext:
        {{- toYaml $V.podSecurityContext | nindent 8 }}
      containers:
        - name: {{ $c }}
          image: {{ include "chainwatch.image" $root | quote }}
          imagePullPolicy: {{ $V.image.pullPolicy }}
          args:
            - {{ index $command $c }}
          env:
            - name: CHAINWATCH_METRICS_PORT
              value: {{ $V.metricsPort | quote }}
            - name: CHAINWATCH_LOG_LEVEL
              value: {{ $V.logLevel | quote }}
            - name: CHAINWATCH_LOG_JSON
              value: {{ $V.logJson | quote }}
            {{- if $collects }}
            - name: CHAINWATCH_NODES
              value: /etc/chainwatch/nodes.yaml
            - name: CHAINWATCH_STATE_DIR
              value: /var/lib/chainwatch
            {{- if not (kindIs "invalid" $V.startBlock) }}
            - name: CHAINWATCH_START_BLOCK
              value: {{ $V.startBlock | int64 | quote }}
            {{- end }}
            {{- range (include "chainwatch.rpcKeys" $root | fromJsonArray) }}
            - name: {{ . }}
              valueFrom:
                secretKeyRef:
                  name: {{ include "chainwatch.rpcSecretName" $root }}
                  key: {{ . }}
            {{- end }}
            {{- end }}
            {{- if $kafka }}
            - name: CHAINWATCH_KAFKA
              value: {{ $V.kafka.bootstrapServers | quote }}
            - name: CHAINWATCH_TOPIC_PREFIX
              value: {{ $V.kafka.topicPrefix | quote }}
            - name: CHAINWATCH_KAFKA_PARTITIONS
              value: {{ $V.kafka.partitions | quote }}
            - name: CHAINWATCH_KAFKA_REPLICATION_FACTOR
              value: {{ $V.kafka.replicationFactor | quote }}
            - name: CHAINWATCH_KAFKA_SECURITY_PROTOCOL
              value: {{ $V.kafka.securityProtocol | quote }}
            {{- if include "chainwatch.sasl" $root }}
            - name: CHAINWATCH_KAFKA_SASL_MECHANISM
              value: {{ $V.kafka.sasl.mechanism | quote }}
            - name: CHAINWATCH_KAFKA_SASL_USERNAME
              value: {{ $V.kafka.sasl.username | quote }}
            - name: CHAINWATCH_KAFKA_SASL_PASSWORD
              valueFrom:
                secretKeyRef:
                  name: {{ include "chainwatch.kafkaSecretName" $root }}
                  key: {{ include "chainwatch.kafkaSecretKey" $root }}
            {{- end }}
            {{- if $V.kafka.tls.caSecret }}
            - name: CHAINWATCH_KAFKA_SSL_CAFILE
              value: /etc/chainwatch/kafka-ca/{{ $V.kafka.tls.caSecretKey }}
            {{- end }}
            {{- end }}
            {{- if eq $c "detector" }}
            - name: CHAINWATCH_GROUP
              value: {{ $v.consumerGroup | quote }}
            {{- end }}
            {{- with $V.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with $v.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          ports:
            - name: metrics
              containerPort: {{ $V.metricsPort }}
              protocol: TCP
          startupProbe:
            httpGet:
              path: /healthz
              port: metrics
            periodSeconds: {{ $V.startupProbe.periodSeconds }}
            failureThreshold: {{ $V.startupProbe.failureThreshold }}
            timeoutSeconds: {{ $V.startupProbe.timeoutSeconds }}
          livenessProbe:
            httpGet:
              path: /healthz
              port: metrics
            periodSeconds: {{ $V.livenessProbe.periodSeconds }}
            failureThreshold: {{ $V.livenessProbe.failureThreshold }}
            timeoutSeconds: {{ $V.livenessProbe.timeoutSeconds }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: metrics
            periodSeconds: {{ $V.readinessProbe.periodSeconds }}
            failureThreshold: {{ $V.readinessProbe.failureThreshold }}
            timeoutSeconds: {{ $V.readinessProbe.timeoutSeconds }}
          {{- with $v.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          securityContext:
            {{- toYaml $V.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if $collects }}
            - name: nodes
              mountPath: /etc/chainwatch/nodes.yaml
              subPath: nodes.yaml
              readOnly: true
            - name: state
              mountPath: /var/lib/chainwatch
            {{- end }}
            {{- if and $kafka $V.kafka.tls.caSecret }}
            - name: kafka-ca
              mountPath: /etc/chainwatch/kafka-ca
              readOnly: true
            {{- end }}
      volumes:
        - name: tmp
          emptyDir: {}
        {{- if $collects }}
        - name: nodes
          configMap:
            name: {{ include "chainwatch.fullname" $root }}-nodes
        - name: state
          {{- if $V.persistence.enabled }}
          persistentVolumeClaim:
            claimName: {{ $V.persistence.existingClaim | default (printf "%s-state" (include "chainwatch.fullname" $root)) }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- end }}
        {{- if and $kafka $V.kafka.tls.caSecret }}
        - name: kafka-ca
          secret:
            secretName: {{ $V.kafka.tls.caSecret }}
            items:
              - key: {{ $V.kafka.tls.caSecretKey }}
                path: {{ $V.kafka.tls.caSecretKey }}
        {{- end }}
      {{- with $v.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $v.topologySpreadConstraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
The metrics Service of one component. Call with (dict "root" $ "component" ...).
It publishes not-ready pods too: a collector whose node is down is not ready, and its
metrics (node_up 0, errors) are exactly what must still be scraped.
*/}}
{{- define "chainwatch.metricsService" -}}
{{- $root := .root }}
{{- $ctx := dict "root" $root "component" .component }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "chainwatch.componentName" $ctx }}
  namespace: {{ include "chainwatch.namespace" $root }}
  labels:
    {{- include "chainwatch.componentLabels" $ctx | nindent 4 }}
    jobLabel: chainwatch-{{ .component }}
    {{- with $root.Values.service.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $root.Values.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $root.Values.service.type }}
  publishNotReadyAddresses: true
  ports:
    - name: metrics
      port: {{ $root.Values.service.port }}
      targetPort: metrics
      protocol: TCP
  selector:
    {{- include "chainwatch.componentSelectorLabels" $ctx | nindent 4 }}
{{- end }}
