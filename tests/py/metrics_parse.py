"""Parses Prometheus text on stdin with prometheus_client's parser and
prints one JSON object: {"<sample name>{<sorted labels>}": value}."""
import json
import sys

from prometheus_client.parser import text_string_to_metric_families

out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
json.dump(out, sys.stdout)
