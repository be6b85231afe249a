{{/*
Names and labels shared by every template.
*/}}

{{- define "lifeboat.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of object names: the release name, with the chart's name unless it has it. */}}
{{- define "lifeboat.fullname" -}}
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

{{- define "lifeboat.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; "component" is passed as (dict "ctx" $ "component" "operator"). */}}
{{- define "lifeboat.labels" -}}
helm.sh/chart: {{ include "lifeboat.chart" .ctx }}
{{ include "lifeboat.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: lifeboat
{{- end }}

{{- define "lifeboat.selectorLabels" -}}
app.kubernetes.io/name: {{ include "lifeboat.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "lifeboat.operator.fullname" -}}
{{- printf "%s-operator" (include "lifeboat.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lifeboat.agent.fullname" -}}
{{- printf "%s-agent" (include "lifeboat.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "lifeboat.operator.serviceAccountName" -}}
{{- default (include "lifeboat.operator.fullname" .) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "lifeboat.agent.serviceAccountName" -}}
{{- default (include "lifeboat.agent.fullname" .) .Values.agent.serviceAccount.name }}
{{- end }}

{{/* An image reference: (dict "ctx" $ "image" .Values.operator.image). */}}
{{- define "lifeboat.image" -}}
{{- $tag := .image.tag | default .ctx.Values.image.tag | default .ctx.Chart.AppVersion }}
{{- if .ctx.Values.image.registry }}
{{- printf "%s/%s:%s" .ctx.Values.image.registry .image.repository $tag }}
{{- else }}
{{- printf "%s:%s" .image.repository $tag }}
{{- end }}
{{- end }}

{{/*
The agents' command line, shared by the Linux and Windows DaemonSets:
(dict "ctx" $ "stateDir" ... "failoverDir" ...). The node's name comes from the downward API.
*/}}
{{- define "lifeboat.agent.args" -}}
- agent
- --node-name=$(NODE_NAME)
- --lease-namespace={{ .ctx.Release.Namespace }}
{{- with .ctx.Values.watchNamespace }}
- --namespace={{ . }}
{{- end }}
- --state-dir={{ .stateDir }}
- --failover-dir={{ .failoverDir }}
- --health-addr=0.0.0.0:{{ .ctx.Values.agent.port }}
- --shutdown-grace={{ .ctx.Values.agent.shutdownGraceSeconds }}s
- --log-format={{ .ctx.Values.logFormat }}
{{- end }}

{{/* The agents' environment: the node's and the pod's names from the downward API. */}}
{{- define "lifeboat.agent.env" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- with .Values.agent.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Probes on the process's own endpoint: (dict "port" "health"). */}}
{{- define "lifeboat.probes" -}}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  initialDelaySeconds: 5
  periodSeconds: 10
  timeoutSeconds: 3
  failureThreshold: 3
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .port }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 3
{{- end }}

{{/* The pod labels of the agents: workload identity's, when it is on. */}}
{{- define "lifeboat.agent.workloadIdentityLabels" -}}
{{- if .Values.storage.workloadIdentity.enabled }}
azure.workload.identity/use: "true"
{{- end }}
{{- end }}
