{{/* Names, labels and the pieces every workload shares (ADR-0023). */}}

{{- define "kestrel.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kestrel.labels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/component: {{ .component }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "kestrel.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "kestrel.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag -}}
{{- if .Values.image.digest -}}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* Pods run as an unprivileged user with the runtime's default seccomp profile. */}}
{{- define "kestrel.podSecurity" -}}
runAsNonRoot: true
runAsUser: {{ .uid | default 10001 }}
runAsGroup: {{ .uid | default 10001 }}
fsGroup: {{ .uid | default 10001 }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Containers: read-only root filesystem, no privilege escalation, every capability dropped. */}}
{{- define "kestrel.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "kestrel.dbHost" -}}{{ include "kestrel.fullname" . }}-db-rw{{- end -}}

{{/* The owner's connection (tables, migrations, every service but the API): CloudNativePG's app secret. */}}
{{- define "kestrel.databaseEnv" -}}
- name: KESTREL_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ if .Values.database.cnpg.enabled }}{{ include "kestrel.fullname" . }}-db-app{{ else }}{{ required "database.externalSecret is required without CloudNativePG" .Values.database.externalSecret }}{{ end }}
      key: uri
{{- end -}}

{{- define "kestrel.natsUrl" -}}nats://{{ include "kestrel.fullname" . }}-nats:4222{{- end -}}

{{/* A backend principal's broker connection: EMQX's internal listener (cluster-only, NetworkPolicy-bound). */}}
{{- define "kestrel.mqttEnv" -}}
- name: KESTREL_{{ .prefix }}_MQTT_HOST
  value: {{ include "kestrel.fullname" .root }}-emqx-internal
- name: KESTREL_{{ .prefix }}_MQTT_PORT
  value: "1883"
- name: KESTREL_{{ .prefix }}_MQTT_USERNAME
  value: {{ .principal }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: KESTREL_{{ .prefix }}_CLIENT_ID
  value: svc:{{ .principal }}:$(POD_NAME)
- name: KESTREL_{{ .prefix }}_MQTT_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .root.Values.secrets.principals }}
      key: {{ .principal }}
{{- end -}}

{{- define "kestrel.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- end -}}

{{/* NetworkPolicy peers. */}}
{{- define "kestrel.peer" -}}
- podSelector:
    matchLabels:
      app.kubernetes.io/instance: {{ .root.Release.Name }}
      app.kubernetes.io/component: {{ .component }}
{{- end -}}
{{- define "kestrel.dbPeer" -}}
- podSelector:
    matchLabels:
      cnpg.io/cluster: {{ include "kestrel.fullname" . }}-db
{{- end -}}
{{- define "kestrel.monitoringPeer" -}}
- namespaceSelector:
    matchLabels:
      kubernetes.io/metadata.name: {{ .Values.networkPolicy.monitoringNamespace }}
{{- end -}}
{{- define "kestrel.dnsEgress" -}}
- to:
    - namespaceSelector:
        matchLabels:
          kubernetes.io/metadata.name: kube-system
      podSelector:
        matchLabels:
          k8s-app: kube-dns
  ports:
    - {protocol: UDP, port: 53}
    - {protocol: TCP, port: 53}
{{- end -}}

{{/* checkov's findings that do not apply, each with its reason, on the workload that has them (ADR-0023). */}}
{{- define "kestrel.checkovSkips" -}}
checkov.io/skip1: CKV_K8S_43=images are pinned to exact release tags; a digest is a value (image.digest, or name@sha256 in emqx.image and nats.image) that the release workflow publishes
checkov.io/skip2: CKV_K8S_15=IfNotPresent with immutable release tags or digests; Always would stop pods from starting while the registry is unreachable
{{- if .env }}
checkov.io/skip3: CKV_K8S_35=the services read their settings from the environment (msgspec settings, KESTREL_*); with openbao.enabled the agent renders the principals' secrets into files instead
{{- end }}
{{- if .uid }}
checkov.io/skip4: CKV_K8S_40=the broker's image owns its files as uid {{ .uid }}; it runs as that unprivileged user, never root
{{- end }}
{{- end -}}
