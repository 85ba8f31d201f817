{{/* The prefix of every object name. */}}
{{- define "palisade.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "palisade.controller.name" -}}{{ include "palisade.fullname" . }}-controller{{- end -}}
{{- define "palisade.agent.name" -}}{{ include "palisade.fullname" . }}-agent{{- end -}}
{{- define "palisade.tls.secret" -}}{{ .Values.tls.existingSecret | default (printf "%s-controller-tls" (include "palisade.fullname" .)) }}{{- end -}}

{{/* Labels on every object. */}}
{{- define "palisade.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ default .Chart.Name .Values.nameOverride }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: palisade
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (pass a dict: ctx, component). */}}
{{- define "palisade.selector" -}}
app.kubernetes.io/name: {{ default .ctx.Chart.Name .ctx.Values.nameOverride }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "palisade.image" -}}
{{ .image.repository }}:{{ .image.tag | default .ctx.Chart.AppVersion }}
{{- end -}}

{{/* The controller's in-cluster DNS names, as in its certificate. */}}
{{- define "palisade.controller.dnsNames" -}}
{{- $svc := include "palisade.controller.name" . -}}
{{- $ns := .Release.Namespace -}}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | toJson -}}
{{- end -}}

{{- define "palisade.controller.address" -}}
{{- .Values.agent.controllerAddress | default (printf "https://%s.%s.svc:%d" (include "palisade.controller.name" .) .Release.Namespace (int .Values.controller.grpcPort)) -}}
{{- end -}}

{{/* Whether the cluster serves the prometheus-operator's kinds. */}}
{{- define "palisade.monitoringApi" -}}
{{- if .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}true{{- end -}}
{{- end -}}

{{/*
The generated TLS material, base64-encoded, as JSON {ca, crt, key}. Generated once per
render (memoised in .Values so that the Secret, the CA ConfigMap and the pods' checksum
annotations agree), and taken from the existing Secret when there is one, so an upgrade
keeps the certificate; deleting the Secret and upgrading rotates it.
*/}}
{{- define "palisade.tls.generated" -}}
{{- if not (hasKey .Values "__palisadeTls") -}}
{{- $name := include "palisade.tls.secret" . -}}
{{- $old := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- $data := dig "data" dict $old -}}
{{- if and (index $data "tls.crt") (index $data "tls.key") (index $data "ca.crt") -}}
{{- $_ := set .Values "__palisadeTls" (dict "ca" (index $data "ca.crt") "crt" (index $data "tls.crt") "key" (index $data "tls.key")) -}}
{{- else -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $ca := genCA (printf "%s-ca" (include "palisade.fullname" .)) $days -}}
{{- $dns := include "palisade.controller.dnsNames" . | fromJsonArray -}}
{{- $cert := genSignedCert (include "palisade.controller.name" .) nil $dns $days $ca -}}
{{- $_ := set .Values "__palisadeTls" (dict "ca" ($ca.Cert | b64enc) "crt" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc)) -}}
{{- end -}}
{{- end -}}
{{- toJson (index .Values "__palisadeTls") -}}
{{- end -}}

{{/* Pod annotation that rolls the pods when a generated certificate changes. */}}
{{- define "palisade.tls.checksum" -}}
{{- if not .Values.tls.existingSecret -}}
checksum/tls: {{ include "palisade.tls.generated" . | sha256sum }}
{{- end -}}
{{- end -}}

{{/*
The agent's --metrics-mode: loopback for a loopback bind, else secure unless turned off.
*/}}
{{- define "palisade.agent.metricsMode" -}}
{{- if eq .Values.agent.metrics.bind "loopback" -}}loopback{{- else if .Values.agent.metrics.secure -}}secure{{- else -}}insecure{{- end -}}
{{- end -}}

{{- define "palisade.controller.metricsMode" -}}
{{- if .Values.controller.metricsSecure -}}secure{{- else -}}insecure{{- end -}}
{{- end -}}

{{/* Whether a scraper needs a token: either component serves secure metrics. */}}
{{- define "palisade.metrics.anySecure" -}}
{{- if or (eq (include "palisade.agent.metricsMode" .) "secure") .Values.controller.metricsSecure -}}true{{- end -}}
{{- end -}}

{{- define "palisade.metricsReader.name" -}}{{ include "palisade.fullname" . }}-metrics-reader{{- end -}}
{{- define "palisade.flowsReader.name" -}}{{ include "palisade.fullname" . }}-flows-reader{{- end -}}
