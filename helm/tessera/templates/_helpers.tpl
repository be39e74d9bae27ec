{{/* Names, labels and the pieces every pod shares. */}}

{{- define "tessera.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include with (list $ "coordinator"). */}}
{{- define "tessera.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "tessera.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tessera.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* etcd endpoints, comma-separated. */}}
{{- define "tessera.etcdEndpoints" -}}
{{- if .Values.etcd.enabled -}}
{{- printf "http://%s-etcd:2379" (include "tessera.fullname" .) -}}
{{- else -}}
{{- if not .Values.etcd.external.endpoints -}}
{{- fail "etcd.enabled is false: set etcd.external.endpoints" -}}
{{- end -}}
{{- join "," .Values.etcd.external.endpoints -}}
{{- end -}}
{{- end -}}

{{/* --model for the coordinator (workers are told the same path), or nothing for the built-in model. */}}
{{- define "tessera.modelArgs" -}}
{{- if ne .Values.model.source "builtin" }}
- --model
- {{ printf "/models/%s" .Values.model.path | trimSuffix "/" | quote }}
{{- end }}
{{- end -}}

{{- define "tessera.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ required "model.pvc.claimName is required with model.source=pvc" .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "hostPath" }}
- name: model
  hostPath:
    path: {{ required "model.hostPath.path is required with model.source=hostPath" .Values.model.hostPath.path }}
    type: Directory
{{- end }}
{{- end -}}

{{/* The LoRA adapters' volume, and where it is mounted. */}}
{{- define "tessera.loraVolume" -}}
{{- if eq .Values.lora.source "pvc" }}
- name: adapters
  persistentVolumeClaim:
    claimName: {{ required "lora.pvc.claimName is required with lora.source=pvc" .Values.lora.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.lora.source "hostPath" }}
- name: adapters
  hostPath:
    path: {{ required "lora.hostPath.path is required with lora.source=hostPath" .Values.lora.hostPath.path }}
    type: Directory
{{- end }}
{{- end }}

{{- define "tessera.loraMount" -}}
{{- if ne .Values.lora.source "none" }}
- name: adapters
  mountPath: /adapters
  readOnly: true
{{- end }}
{{- end }}

{{/* --lora NAME=/adapters/PATH for each adapter loaded at start, and the limits. */}}
{{- define "tessera.loraArgs" -}}
{{- if and .Values.lora.adapters (eq .Values.lora.source "none") }}
{{- fail "lora.adapters needs lora.source (pvc or hostPath): the adapters' files come from that volume" }}
{{- end }}
{{- range .Values.lora.adapters }}
- --lora
- {{ printf "%s=/adapters/%s" .name (.path | trimSuffix "/") | quote }}
{{- end }}
- --max-loras
- {{ .Values.lora.maxLoras | quote }}
- --max-lora-rank
- {{ .Values.lora.maxLoraRank | quote }}
{{- end }}

{{- define "tessera.modelMount" -}}
{{- if ne .Values.model.source "builtin" }}
- name: model
  mountPath: /models
  readOnly: true
{{- end }}
{{- end -}}

{{/* Arguments before the subcommand: logging and tracing, from the ConfigMap's values. */}}
{{- define "tessera.globalArgs" -}}
- --log-format
- {{ .Values.logging.format }}
{{- if .Values.tracing.otlpEndpoint }}
- --otlp-endpoint
- {{ .Values.tracing.otlpEndpoint | quote }}
- --otlp-sampling-ratio
- {{ .Values.tracing.samplingRatio | quote }}
{{- end }}
{{- end -}}

{{- define "tessera.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tessera.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The Secret holding the cluster token. */}}
{{- define "tessera.clusterTokenSecret" -}}
{{- default (printf "%s-cluster-token" (include "tessera.fullname" .)) .Values.clusterToken.existingSecret -}}
{{- end }}

{{/* The cluster token, from its Secret, for the coordinator and the workers. */}}
{{- define "tessera.clusterTokenEnv" -}}
{{- if .Values.clusterToken.enabled }}
- name: TESSERA_CLUSTER_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "tessera.clusterTokenSecret" . }}
      key: token
{{- end }}
{{- end }}
