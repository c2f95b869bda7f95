{{- define "headavatar.labels" -}}
app.kubernetes.io/part-of: headavatar
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
