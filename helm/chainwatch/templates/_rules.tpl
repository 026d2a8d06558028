{{/*
The project's Prometheus rules, read from the chart's files/rules/*.yaml (Prometheus rule
files, generated from alerts/ by `python -m alerts.render`; never edited by hand).
Returns the rule files' groups as a JSON list, in file order, with prometheusRule's
settings applied:
  - disabled: rules (alert or record name) left out; a group left empty is dropped;
  - overrides.<alert>.for / .severity: replace `for` and the `severity` label;
  - runbookUrlPrefix: replaces the part of runbook_url before '#';
  - additionalRuleLabels: added to every alert (the rule's own labels win).
*/}}
{{- define "chainwatch.ruleGroups" -}}
{{- $v := .Values.prometheusRule }}
{{- $groups := list }}
{{- $seen := list }}
{{- range $path, $_ := .Files.Glob "files/rules/*.yaml" }}
{{- $doc := $.Files.Get $path | fromYaml }}
{{- if hasKey $doc "Error" }}
{{- fail (printf "\nchainwatch: %s is not a valid rule file: %s" $path $doc.Error) }}
{{- end }}
{{- range $group := $doc.groups }}
{{- if has $group.name $seen }}
{{- fail (printf "\nchainwatch: rule group %q appears twice in files/rules" $group.name) }}
{{- end }}
{{- $seen = append $seen $group.name }}
{{- $rules := list }}
{{- range $rule := $group.rules }}
{{- $name := $rule.alert | default $rule.record }}
{{- if not (index $v.disabled $name) }}
{{- $out := deepCopy $rule }}
{{- if $rule.alert }}
{{- $o := index $v.overrides $rule.alert | default dict }}
{{- if index $o "for" }}
{{- $_ := set $out "for" (index $o "for") }}
{{- end }}
{{- $labels := merge (dict) (deepCopy ($rule.labels | default dict)) (deepCopy $v.additionalRuleLabels) }}
{{- if $o.severity }}
{{- $_ := set $labels "severity" $o.severity }}
{{- end }}
{{- if $labels }}
{{- $_ := set $out "labels" $labels }}
{{- end }}
{{- if $v.runbookUrlPrefix }}
{{- $annotations := deepCopy ($rule.annotations | default dict) }}
{{- $anchor := lower $rule.alert }}
{{- $url := $annotations.runbook_url | default "" }}
{{- if contains "#" $url }}
{{- $anchor = (splitn "#" 2 $url)._1 }}
{{- end }}
{{- $_ := set $annotations "runbook_url" (printf "%s#%s" $v.runbookUrlPrefix $anchor) }}
{{- $_ := set $out "annotations" $annotations }}
{{- end }}
{{- end }}
{{- $rules = append $rules $out }}
{{- end }}
{{- end }}
{{- if $rules }}
{{- $g := deepCopy $group }}
{{- $_ := set $g "rules" $rules }}
{{- $groups = append $groups $g }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson $groups }}
{{- end }}

{{/*
Names in the rule files, as JSON: {"alerts": [...], "records": [...]}.
*/}}
{{- define "chainwatch.ruleNames" -}}
{{- $alerts := list }}
{{- $records := list }}
{{- range $path, $_ := .Files.Glob "files/rules/*.yaml" }}
{{- $doc := $.Files.Get $path | fromYaml }}
{{- range $group := $doc.groups }}
{{- range $rule := $group.rules }}
{{- if $rule.alert }}
{{- $alerts = append $alerts $rule.alert }}
{{- else if $rule.record }}
{{- $records = append $records $rule.record }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- toJson (dict "alerts" ($alerts | uniq) "records" ($records | uniq)) }}
{{- end }}
