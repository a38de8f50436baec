{{/* Name prefix of every object: the release name, plus "-walt" unless it already says walt. */}}
{{- define "walt.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else if contains "walt" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-walt" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels shared by every object; pass (dict "root" $ "component" "operator"). */}}
{{- define "walt.labels" -}}
app.kubernetes.io/name: walt
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: walt
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version | replace "+" "_" }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Selector labels; pass (dict "root" $ "component" "operator"). */}}
{{- define "walt.selectorLabels" -}}
app.kubernetes.io/name: walt
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* The walt image reference (digest wins over tag). */}}
{{- define "walt.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Registry host[:port] the lab keeps its images in. */}}
{{- define "walt.registryHost" -}}
{{- if .Values.registry.embedded.enabled -}}
{{- printf "%s-registry.%s.svc:%v" (include "walt.fullname" .) .Release.Namespace .Values.registry.embedded.service.port -}}
{{- else -}}
{{- required "registry.external (host[:port]) is required when registry.embedded.enabled is false" .Values.registry.external -}}
{{- end -}}
{{- end -}}

{{/* Name of the registry credentials Secret, or "" when the registry is used anonymously. */}}
{{- define "walt.registryCredentialsSecret" -}}
{{- if .Values.registry.credentials.existingSecret -}}
{{- .Values.registry.credentials.existingSecret -}}
{{- else if or .Values.registry.embedded.enabled .Values.registry.credentials.password -}}
{{- printf "%s-registry-credentials" (include "walt.fullname" .) -}}
{{- end -}}
{{- end -}}

{{/* Name of the node key Secret. */}}
{{- define "walt.nodeKeySecret" -}}
{{- default (printf "%s-node-key" (include "walt.fullname" .)) .Values.nodeKey.existingSecret -}}
{{- end -}}

{{/*
Registry password: the one given, else the one already stored in the generated Secret (kept across
upgrades), else a new random one. Computed once per render and cached in .Values so that every template
agrees.
*/}}
{{- define "walt.registryPassword" -}}
{{- if not (hasKey .Values.registry.credentials "_resolved") -}}
{{- $password := .Values.registry.credentials.password -}}
{{- if not $password -}}
{{- $name := printf "%s-registry-credentials" (include "walt.fullname" .) -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace $name -}}
{{- if and $existing $existing.data (hasKey $existing.data "password") -}}
{{- $password = index $existing.data "password" | b64dec -}}
{{- else -}}
{{- $password = randAlphaNum 32 -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values.registry.credentials "_resolved" $password -}}
{{- end -}}
{{- index .Values.registry.credentials "_resolved" -}}
{{- end -}}

{{/* Configuration of the embedded Distribution registry. */}}
{{- define "walt.registryConfig" -}}
version: 0.1
log:
  level: info
  formatter: json
storage:
  filesystem:
    rootdirectory: /var/lib/registry
  delete:
    enabled: true
auth:
{{- if .Values.registry.tokenAuth.enabled }}
  token:
    realm: {{ include "walt.registryTokenRealm" . }}
    service: walt-registry
    issuer: walt-operator
    rootcertbundle: /auth/token.crt
{{- else }}
  htpasswd:
    realm: walt
    path: /auth/htpasswd
{{- end }}
http:
  addr: :{{ .Values.registry.embedded.service.port }}
  debug:
    addr: :5001
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
{{- end -}}

{{/* URL of the operator's registry token endpoint (the registry's auth.token.realm). */}}
{{- define "walt.registryTokenRealm" -}}
{{- printf "http://%s-registry-token.%s.svc:%v/token" (include "walt.fullname" .) .Release.Namespace .Values.registry.tokenAuth.port -}}
{{- end -}}

{{/*
The API server's endpoint addresses the operator may reach, as a JSON array of CIDRs:
networkPolicy.egress.apiServerCIDRs when set, else the addresses of the `kubernetes` EndpointSlice looked up in
the cluster at install (helm install/upgrade, `helm template --dry-run=server`); empty when nothing can be
looked up (`helm template` for GitOps), and the policy then allows any address on apiServerPorts.
*/}}
{{- define "walt.apiServerCIDRs" -}}
{{- $cidrs := list }}
{{- if .Values.networkPolicy.egress.apiServerCIDRs }}
{{- $cidrs = .Values.networkPolicy.egress.apiServerCIDRs }}
{{- else }}
{{- $slice := lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" }}
{{- range (dig "endpoints" list $slice) }}
{{- range .addresses }}
{{- $cidrs = append $cidrs (printf "%s/%s" . (ternary "128" "32" (contains ":" .))) }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $cidrs }}
{{- end }}
