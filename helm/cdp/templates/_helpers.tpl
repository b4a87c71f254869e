{{/*
Names, labels, the image, the config file and the pod spec every stage
shares. One stage table: the templates range over it, so a new stage (or
service) of the binary is one line here and one values block.
*/}}

{{/* The stages: name -> workload kind. Subcommand = name. */}}
{{- define "cdp.stages" -}}
collect: Deployment
validate: StatefulSet
identity: StatefulSet
traits: StatefulSet
audiences: StatefulSet
deliver: Deployment
{{- end -}}

{{- define "cdp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cdp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Name of a stage's resources: <fullname>-<stage>, within 52 characters
     so a StatefulSet's pod names and controller-revision labels fit 63. */}}
{{- define "cdp.stageName" -}}
{{- printf "%s-%s" (include "cdp.fullname" .root | trunc 42 | trimSuffix "-") .stage -}}
{{- end -}}

{{- define "cdp.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "cdp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ (.Values.image.tag | default .Chart.AppVersion) | toString | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: cdp
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "cdp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cdp.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .stage }}
{{- end -}}

{{- define "cdp.stageLabels" -}}
{{ include "cdp.labels" .root }}
app.kubernetes.io/component: {{ .stage }}
{{- end -}}

{{- define "cdp.annotations" -}}
{{- with .Values.commonAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "cdp.image" -}}
{{- $img := .Values.image -}}
{{- $repo := $img.repository -}}
{{- if $img.registry }}{{ $repo = printf "%s/%s" $img.registry $img.repository }}{{ end -}}
{{- if $img.digest -}}
{{- printf "%s@%s" $repo $img.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo ($img.tag | default .Chart.AppVersion | toString) -}}
{{- end -}}
{{- end -}}

{{- define "cdp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cdp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "cdp.configName" -}}{{ include "cdp.fullname" . }}-config{{- end -}}
{{- define "cdp.kafkaSecretName" -}}
{{- .Values.kafka.sasl.existingSecret | default (printf "%s-kafka" (include "cdp.fullname" .)) -}}
{{- end -}}
{{- define "cdp.envSecretName" -}}{{ include "cdp.fullname" . }}-env{{- end -}}

{{/* Where things live inside the containers. */}}
{{- define "cdp.configPath" -}}/etc/cdp/cdp.yaml{{- end -}}
{{- define "cdp.stateDir" -}}/var/lib/cdp{{- end -}}
{{- define "cdp.caDir" -}}/etc/cdp/kafka-ca{{- end -}}
{{- define "cdp.clientCertDir" -}}/etc/cdp/kafka-client{{- end -}}
{{- define "cdp.collectPort" -}}8088{{- end -}}

{{/* librdkafka properties the chart derives from kafka.sasl and kafka.tls. */}}
{{- define "cdp.kafkaProperties" -}}
{{- $k := .Values.kafka -}}
{{- $p := deepCopy ($k.properties | default dict) -}}
{{- if and $k.sasl.enabled $k.tls.enabled -}}
{{- $_ := set $p "security.protocol" "SASL_SSL" -}}
{{- else if $k.sasl.enabled -}}
{{- $_ := set $p "security.protocol" "SASL_PLAINTEXT" -}}
{{- else if $k.tls.enabled -}}
{{- $_ := set $p "security.protocol" "SSL" -}}
{{- end -}}
{{- if $k.sasl.enabled -}}
{{- $_ := set $p "sasl.mechanisms" $k.sasl.mechanism -}}
{{- end -}}
{{- if and $k.tls.enabled $k.tls.caSecret -}}
{{- $_ := set $p "ssl.ca.location" (printf "%s/%s" (include "cdp.caDir" .) $k.tls.caKey) -}}
{{- end -}}
{{- if and $k.tls.enabled $k.tls.clientCertSecret -}}
{{- $_ := set $p "ssl.certificate.location" (printf "%s/tls.crt" (include "cdp.clientCertDir" .)) -}}
{{- $_ := set $p "ssl.key.location" (printf "%s/tls.key" (include "cdp.clientCertDir" .)) -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/* cdp.yaml: `config` with the kafka section the chart owns. */}}
{{- define "cdp.configFile" -}}
{{- $cfg := deepCopy (.Values.config | default dict) -}}
{{- $kafka := deepCopy (get $cfg "kafka" | default dict) -}}
{{- $_ := set $kafka "brokers" .Values.kafka.brokers -}}
{{- $_ := set $kafka "topic_prefix" .Values.kafka.topicPrefix -}}
{{- $_ := set $kafka "partitions" (int .Values.kafka.partitions) -}}
{{- $_ := set $kafka "replication_factor" (int .Values.kafka.replicationFactor) -}}
{{- $_ := set $kafka "guarantee" .Values.kafka.guarantee -}}
{{- $_ := set $kafka "state_dir" (include "cdp.stateDir" .) -}}
{{- $props := fromYaml (include "cdp.kafkaProperties" .) -}}
{{- if $props -}}
{{- $_ := set $kafka "properties" $props -}}
{{- end -}}
{{- if .Values.kafka.sasl.enabled -}}
{{- $_ := set $kafka "secret_env" (dict "sasl.username" "KAFKA_SASL_USERNAME" "sasl.password" "KAFKA_SASL_PASSWORD") -}}
{{- end -}}
{{- $_ := set $cfg "kafka" $kafka -}}
# cdp.yaml rendered by the cdp chart: edit `config` and `kafka` in the values.
{{ toYaml $cfg }}
{{- end -}}

{{/* Checksum of everything a pod reads at start, so a change rolls it. */}}
{{- define "cdp.configChecksum" -}}
{{- $secrets := dict "kafka" (pick .Values.kafka.sasl "username" "password" "existingSecret") "env" .Values.secretEnv "tls" .Values.kafka.tls -}}
{{- printf "%s\n%s" (include "cdp.configFile" .) (toJson $secrets) | sha256sum -}}
{{- end -}}

{{/* A stage's values with the shared ones under them. Usage:
     include "cdp.stageValues" (dict "root" $ "stage" "validate") | fromYaml */}}
{{- define "cdp.stageValues" -}}
{{- $v := .root.Values -}}
{{- $s := deepCopy (get $v .stage) -}}
{{- range $key := list "nodeSelector" "affinity" "podAnnotations" "podLabels" -}}
{{- $_ := set $s $key (merge (deepCopy (get $s $key | default dict)) (deepCopy (get $v $key | default dict))) -}}
{{- end -}}
{{- range $key := list "tolerations" "topologySpreadConstraints" -}}
{{- if not (get $s $key) -}}{{- $_ := set $s $key (get $v $key | default list) -}}{{- end -}}
{{- end -}}
{{- if not $s.priorityClassName -}}{{- $_ := set $s "priorityClassName" $v.priorityClassName -}}{{- end -}}
{{- range $key := list "extraEnv" "extraEnvFrom" "extraVolumes" "extraVolumeMounts" "sidecars" "initContainers" -}}
{{- $_ := set $s $key (concat (get $v $key | default list) (get $s $key | default list)) -}}
{{- end -}}
{{- toYaml $s -}}
{{- end -}}

{{/* The environment of a cdp container. */}}
{{- define "cdp.env" -}}
{{- $v := .root.Values -}}
- name: CDP_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: CDP_LOG
  value: {{ $v.logLevel | quote }}
{{- if .podName }}
# Static group membership: a restarted pod rejoins as the same member and
# gets its partitions, and so its local state, back without a rebalance.
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- end }}
{{- if $v.kafka.sasl.enabled }}
- name: KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .secretName | default (include "cdp.kafkaSecretName" .root) }}
      key: {{ $v.kafka.sasl.usernameKey }}
- name: KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .secretName | default (include "cdp.kafkaSecretName" .root) }}
      key: {{ $v.kafka.sasl.passwordKey }}
{{- end }}
{{- if .secretEnv }}
{{- range $v.secretEnv }}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      {{- if .secretName }}
      name: {{ .secretName }}
      key: {{ .key }}
      {{- else }}
      name: {{ include "cdp.envSecretName" $.root }}
      key: {{ .name }}
      {{- end }}
{{- end }}
{{- end }}
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Mounts of the config file and the Kafka certificates. */}}
{{- define "cdp.configMounts" -}}
- name: config
  mountPath: /etc/cdp/cdp.yaml
  subPath: cdp.yaml
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: {{ include "cdp.caDir" . }}
  readOnly: true
{{- end }}
{{- if and .Values.kafka.tls.enabled .Values.kafka.tls.clientCertSecret }}
- name: kafka-client-cert
  mountPath: {{ include "cdp.clientCertDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes for those mounts. `configName` picks the ConfigMap/Secret
     (the hook Job has its own). */}}
{{- define "cdp.configVolumes" -}}
{{- $v := .root.Values -}}
- name: config
  {{- if $v.configAsSecret }}
  secret:
    secretName: {{ .configName }}
  {{- else }}
  configMap:
    name: {{ .configName }}
  {{- end }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if and $v.kafka.tls.enabled $v.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ $v.kafka.tls.caSecret }}
    items:
      - key: {{ $v.kafka.tls.caKey }}
        path: {{ $v.kafka.tls.caKey }}
{{- end }}
{{- if and $v.kafka.tls.enabled $v.kafka.tls.clientCertSecret }}
- name: kafka-client-cert
  secret:
    secretName: {{ $v.kafka.tls.clientCertSecret }}
{{- end }}
{{- end -}}

{{/* Affinity: the stage's, else the shared one, else the anti-affinity preset. */}}
{{- define "cdp.affinity" -}}
{{- $v := .root.Values -}}
{{- if .values.affinity -}}
{{ toYaml .values.affinity }}
{{- else if eq $v.podAntiAffinityPreset "soft" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "cdp.selectorLabels" . | nindent 12 }}
{{- else if eq $v.podAntiAffinityPreset "hard" -}}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "cdp.selectorLabels" . | nindent 10 }}
{{- end -}}
{{- end -}}

{{/* The pod template of a stage. Arguments: root, stage, values (merged
     stage values), kind. */}}
{{- define "cdp.podTemplate" -}}
{{- $root := .root -}}
{{- $v := $root.Values -}}
{{- $s := .values -}}
{{- $stateful := eq .kind "StatefulSet" -}}
metadata:
  labels:
    {{- include "cdp.stageLabels" . | nindent 4 }}
    {{- with $s.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "cdp.configChecksum" $root }}
    {{- with $s.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "cdp.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $v.serviceAccount.automountServiceAccountToken }}
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $s.terminationGracePeriodSeconds }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  {{- with $s.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $s.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with (include "cdp.affinity" .) }}
  affinity:
    {{- . | nindent 4 }}
  {{- end }}
  {{- with $s.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range . }}
    {{- $c := deepCopy . }}
    {{- if not $c.labelSelector }}
    {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "cdp.selectorLabels" $ | fromYaml)) }}
    {{- end }}
    - {{ toYaml $c | nindent 6 | trim }}
    {{- end }}
  {{- end }}
  {{- with $s.initContainers }}
  initContainers:
    {{- tpl (toYaml .) $root | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .stage }}
      image: {{ include "cdp.image" $root }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - {{ .stage }}
        - --config
        - {{ include "cdp.configPath" $root }}
        - --admin-listen
        - 0.0.0.0:{{ $v.adminPort }}
        {{- if ne .stage "collect" }}
        - --state-dir
        - {{ include "cdp.stateDir" $root }}
        {{- else }}
        - --listen
        - 0.0.0.0:{{ include "cdp.collectPort" $root }}
        {{- end }}
        {{- with $s.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        {{- include "cdp.env" (dict "root" $root "podName" (and $stateful $root.Values.kafka.staticMembership) "secretEnv" (eq .stage "deliver") "extraEnv" $s.extraEnv) | nindent 8 }}
      {{- with $s.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      ports:
        - name: admin
          containerPort: {{ $v.adminPort }}
          protocol: TCP
        {{- if eq .stage "collect" }}
        - name: http
          containerPort: {{ include "cdp.collectPort" $root }}
          protocol: TCP
        {{- end }}
      livenessProbe:
        {{- toYaml $v.livenessProbe | nindent 8 }}
      readinessProbe:
        {{- toYaml $v.readinessProbe | nindent 8 }}
      {{- if and (eq .stage "collect") $s.preStopSleepSeconds (semverCompare ">=1.30-0" $root.Capabilities.KubeVersion.Version) }}
      lifecycle:
        preStop:
          sleep:
            seconds: {{ $s.preStopSleepSeconds }}
      {{- end }}
      resources:
        {{- toYaml $s.resources | nindent 8 }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "cdp.configMounts" $root | nindent 8 }}
        {{- if ne .stage "collect" }}
        - name: state
          mountPath: {{ include "cdp.stateDir" $root }}
        {{- end }}
        {{- with $s.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- with $s.sidecars }}
    {{- tpl (toYaml .) $root | nindent 4 }}
    {{- end }}
  volumes:
    {{- include "cdp.configVolumes" (dict "root" $root "configName" (include "cdp.configName" $root)) | nindent 4 }}
    {{- if and (ne .stage "collect") (or (not $stateful) (not $s.persistence.enabled)) }}
    - name: state
      emptyDir: {}
    {{- end }}
    {{- with $s.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
{{- end -}}
