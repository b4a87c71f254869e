{{/*
Every cross-field rule values.schema.json cannot express, checked at once:
the release fails with the whole list, not the first mistake.
*/}}
{{- define "cdp.validateValues" -}}
{{- $v := .Values -}}
{{- $errors := list -}}
{{- if not $v.kafka.brokers -}}
{{- $errors = append $errors "kafka.brokers: required (the bootstrap servers of your Kafka; the chart brings no broker)" -}}
{{- end -}}
{{- if $v.kafka.sasl.enabled -}}
{{- if and (not $v.kafka.sasl.existingSecret) (or (not $v.kafka.sasl.username) (not $v.kafka.sasl.password)) -}}
{{- $errors = append $errors "kafka.sasl: set existingSecret, or both username and password" -}}
{{- end -}}
{{- if and $v.kafka.sasl.existingSecret (or $v.kafka.sasl.username $v.kafka.sasl.password) -}}
{{- $errors = append $errors "kafka.sasl: username/password are ignored with existingSecret; remove them" -}}
{{- end -}}
{{- end -}}
{{- if and (not $v.kafka.tls.enabled) (or $v.kafka.tls.caSecret $v.kafka.tls.clientCertSecret) -}}
{{- $errors = append $errors "kafka.tls: caSecret/clientCertSecret are set but kafka.tls.enabled is false" -}}
{{- end -}}
{{- range $key, $_ := $v.kafka.properties -}}
{{- if hasPrefix "sasl.oauthbearer." (trimPrefix "consumer." (trimPrefix "producer." $key)) -}}
{{- $errors = append $errors (printf "kafka.properties.%s: OAUTHBEARER (OIDC, AWS MSK IAM) is not supported: cdp is built without libcurl; use SASL PLAIN, SCRAM-SHA-256/512 or mutual TLS" $key) -}}
{{- else if or (hasPrefix "sasl." (trimPrefix "consumer." (trimPrefix "producer." $key))) (eq $key "security.protocol") (hasSuffix ".password" $key) -}}
{{- $errors = append $errors (printf "kafka.properties.%s: set through kafka.sasl / kafka.tls (credentials only from Secrets)" $key) -}}
{{- end -}}
{{- end -}}
{{- $config := $v.config | default dict -}}
{{- range $key, $_ := (get $config "kafka" | default dict) -}}
{{- if has $key (list "brokers" "topic_prefix" "partitions" "replication_factor" "guarantee" "state_dir" "properties" "secret_env") -}}
{{- $errors = append $errors (printf "config.kafka.%s: the chart writes it; use kafka.* values instead" $key) -}}
{{- end -}}
{{- end -}}
{{- $secretEnv := list -}}
{{- range $i, $e := $v.secretEnv -}}
{{- $secretEnv = append $secretEnv $e.name -}}
{{- if and $e.value $e.secretName -}}
{{- $errors = append $errors (printf "secretEnv[%d] (%s): value and secretName are exclusive" $i $e.name) -}}
{{- else if and (not $e.value) (or (not $e.secretName) (not $e.key)) -}}
{{- $errors = append $errors (printf "secretEnv[%d] (%s): set value, or secretName and key" $i $e.name) -}}
{{- end -}}
{{- end -}}
{{- range $e := concat $v.extraEnv $v.deliver.extraEnv -}}
{{- $secretEnv = append $secretEnv $e.name -}}
{{- end -}}
{{- range $i, $d := (get $config "destinations" | default list) -}}
{{- range $field := list "secret_env" "write_key_env" -}}
{{- $var := get $d $field -}}
{{- if and $var (not (has $var $secretEnv)) -}}
{{- $errors = append $errors (printf "config.destinations[%d].%s: %s is not provided; add it to secretEnv" $i $field $var) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- if and $v.collect.enabled (eq (int $v.adminPort) (int (include "cdp.collectPort" .))) -}}
{{- $errors = append $errors (printf "adminPort: %d is the collector's HTTP port; pick another (default 9464)" (int $v.adminPort)) -}}
{{- end -}}
{{- $a := $v.collect.autoscaling -}}
{{- if and $v.collect.enabled $a.enabled (gt (int $a.minReplicas) (int $a.maxReplicas)) -}}
{{- $errors = append $errors "collect.autoscaling: minReplicas is greater than maxReplicas" -}}
{{- end -}}
{{- if and $v.collect.enabled $v.collect.ingress.enabled (not $v.collect.ingress.hosts) -}}
{{- $errors = append $errors "collect.ingress.hosts: at least one host when the ingress is enabled" -}}
{{- end -}}
{{- if and $v.collect.enabled (ne $v.collect.service.type "NodePort") (ne $v.collect.service.type "LoadBalancer") $v.collect.service.nodePort -}}
{{- $errors = append $errors "collect.service.nodePort: only for type NodePort or LoadBalancer" -}}
{{- end -}}
{{- range $stage, $kind := include "cdp.stages" . | fromYaml -}}
{{- $s := get $v $stage -}}
{{- if and $s.enabled (eq $kind "StatefulSet") $s.persistence.enabled (not $s.persistence.size) -}}
{{- $errors = append $errors (printf "%s.persistence.size: required when persistence is enabled" $stage) -}}
{{- end -}}
{{- end -}}
{{- if $errors -}}
{{- fail (printf "\n\ncdp: invalid values:\n  - %s\n" (join "\n  - " $errors)) -}}
{{- end -}}
{{- end -}}
