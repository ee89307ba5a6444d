{{/* Name of the chart, overridable. */}}
{{- define "stowage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name, with the chart name unless it holds it. */}}
{{- define "stowage.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "stowage.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "stowage.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "stowage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component (controller, node, nfs-server): pass (list $ "component"). */}}
{{- define "stowage.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "stowage.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "stowage.componentLabels" -}}
{{ include "stowage.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "stowage.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}
{{- end -}}

{{- define "stowage.controllerServiceAccount" -}}
{{- if .Values.controller.serviceAccount.create -}}
{{ default (printf "%s-controller" (include "stowage.fullname" .)) .Values.controller.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.controller.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{- define "stowage.nodeServiceAccount" -}}
{{- if .Values.node.serviceAccount.create -}}
{{ default (printf "%s-node" (include "stowage.fullname" .)) .Values.node.serviceAccount.name }}
{{- else -}}
{{ default "default" .Values.node.serviceAccount.name }}
{{- end -}}
{{- end -}}

{{/* The kubelet plugin directory of this driver on the hosts. */}}
{{- define "stowage.pluginDir" -}}
{{ trimSuffix "/" .Values.node.kubeletDir }}/plugins/{{ .Values.driverName }}
{{- end -}}

{{/* The node plugin's socket: what `stowage node` defaults to, and what kubelet dials. */}}
{{- define "stowage.nodeSocket" -}}
{{ include "stowage.pluginDir" . }}/csi.sock
{{- end -}}

{{- define "stowage.nfsServerName" -}}
{{ include "stowage.fullname" . }}-nfs-server
{{- end -}}

{{/* The in-cluster NFS server's StorageClass: named like its Service and StatefulSet, so it
never takes the name of a storageClasses[] entry such as the example `stowage-nfs`. */}}
{{- define "stowage.nfsServerClassName" -}}
{{ .Values.nfsServer.storageClass.name | default (include "stowage.nfsServerName" .) }}
{{- end -}}

{{/* Fails the render when two StorageClasses the chart creates share a name: Kubernetes
would keep only the last one applied, and `helm install` would not say so. */}}
{{- define "stowage.checkStorageClassNames" -}}
{{- $seen := dict -}}
{{- range $i, $class := .Values.storageClasses }}
{{- if $class.enabled }}
{{- $here := printf "storageClasses[%d]" $i }}
{{- with get $seen $class.name }}
{{- fail (printf "StorageClass %q is defined twice, by %s and by %s: every StorageClass of the chart needs its own name" $class.name . $here) }}
{{- end }}
{{- $_ := set $seen $class.name $here }}
{{- end }}
{{- end }}
{{- if and .Values.nfsServer.enabled .Values.nfsServer.storageClass.create }}
{{- $name := include "stowage.nfsServerClassName" . }}
{{- with get $seen $name }}
{{- fail (printf "StorageClass %q is defined twice, by %s and by the in-cluster NFS server (nfsServer.storageClass.name, default <fullname>-nfs-server): give one of them another name" $name .) }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The in-cluster NFS server's Service as the node plugin and the controller resolve it. */}}
{{- define "stowage.nfsServerHost" -}}
{{ include "stowage.nfsServerName" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{/* The NFS volumes' driver name: nfsDriverName when the install serves NFS, else empty. */}}
{{- define "stowage.nfsDriverName" -}}
{{- if and .Values.nfsDriverName (has "nfs" .Values.backends) (ne .Values.nfsDriverName .Values.driverName) -}}
{{ .Values.nfsDriverName }}
{{- end -}}
{{- end -}}

{{/*
A StorageClass's provisioner, from (list $ class): the NFS name for an NFS class
(`backend: nfs`, or no `backend` while nfs is the first backend), else driverName. A
class that exists already keeps its provisioner: it cannot be changed in place.
*/}}
{{- define "stowage.classProvisioner" -}}
{{- $root := index . 0 -}}
{{- $class := index . 1 -}}
{{- $nfsName := include "stowage.nfsDriverName" $root -}}
{{- $backend := (get ($class.parameters | default dict) "backend") | default (first $root.Values.backends) -}}
{{- $wanted := ternary $nfsName $root.Values.driverName (and (ne $nfsName "") (eq $backend "nfs")) -}}
{{- $existing := lookup "storage.k8s.io/v1" "StorageClass" "" $class.name -}}
{{- if $existing -}}
{{ $existing.provisioner }}
{{- else -}}
{{ $wanted }}
{{- end -}}
{{- end -}}

{{/* Flags every stowage CSI role shares: driver, backends, the NFS default export. */}}
{{- define "stowage.storageArgs" -}}
- --driver-name={{ .Values.driverName }}
- --nfs-driver-name={{ include "stowage.nfsDriverName" . }}
- --log-format={{ .Values.logFormat }}
- --backend={{ join "," .Values.backends }}
{{- if or .Values.nfs.server .Values.nfs.share }}
{{- if not (and .Values.nfs.server .Values.nfs.share) }}
{{- fail "nfs.server and nfs.share: set both (the default export) or neither" }}
{{- end }}
{{- if has "nfs" .Values.backends }}
- --nfs-server={{ .Values.nfs.server }}
- --nfs-share={{ .Values.nfs.share }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Flags of the backends' clients: only the controller calls NFS and EC2. */}}
{{- define "stowage.clientArgs" -}}
{{- if has "nfs" .Values.backends }}
- --nfs-timeout={{ .Values.nfs.timeout }}
- --nfs-connections={{ .Values.nfs.connections }}
{{- end }}
{{- if has "ebs" .Values.backends }}
{{- with .Values.ebs.region }}
- --region={{ . }}
{{- end }}
- --cluster-id={{ .Values.ebs.clusterId }}
{{- end }}
{{- end -}}

{{/* Fails the render when a StorageClass names a provisioner secret the provisioner may not read. */}}
{{- define "stowage.checkSecrets" -}}
{{- $classes := list -}}
{{- range .Values.storageClasses }}{{ if .enabled }}{{ $classes = append $classes . }}{{ end }}{{ end -}}
{{- if and .Values.nfsServer.enabled .Values.nfsServer.storageClass.create }}{{ $classes = append $classes .Values.nfsServer.storageClass }}{{ end -}}
{{- range $class := $classes }}
{{- range $key, $_ := ($class.parameters | default dict) }}
{{- if and (hasPrefix "csi.storage.k8s.io/provisioner-secret-" $key) (not $.Values.rbac.provisionerSecrets) }}
{{- fail (printf "StorageClass %s names a provisioner secret (%s): set rbac.provisionerSecrets=true so the provisioner may get it" (default "(in-cluster NFS)" $class.name) $key) }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The loops `stowage controller` runs: controller.loops, plus snapshot-controller when snapshots.controller. Comma-separated. */}}
{{- define "stowage.loops" -}}
{{- $loops := .Values.controller.loops -}}
{{- if .Values.snapshots.controller -}}
{{- $loops = append $loops "snapshot-controller" -}}
{{- end -}}
{{- join "," $loops -}}
{{- end -}}
