#!/usr/bin/env bash
# Makes the webhook's serving certificate (a self-signed CA and a leaf for
# rampart-webhook.rampart-system.svc), stores it in the Secret
# rampart-webhook-tls, and puts the CA into the MutatingWebhookConfiguration.
# Run after `kubectl apply -k deploy/webhook`; rerun to rotate.
set -euo pipefail
ns=rampart-system
svc=rampart-webhook
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 \
  -subj "/CN=rampart-webhook-ca" -keyout "$dir/ca.key" -out "$dir/ca.crt" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=$svc.$ns.svc" -keyout "$dir/tls.key" -out "$dir/tls.csr" 2>/dev/null
printf 'subjectAltName=DNS:%s,DNS:%s.%s,DNS:%s.%s.svc\n' "$svc" "$svc" "$ns" "$svc" "$ns" >"$dir/ext"
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" -CAcreateserial \
  -days 365 -extfile "$dir/ext" -out "$dir/tls.crt" 2>/dev/null
kubectl -n "$ns" create secret tls rampart-webhook-tls --cert="$dir/tls.crt" --key="$dir/tls.key" \
  --dry-run=client -o yaml | kubectl apply -f -
ca=$(base64 -w0 <"$dir/ca.crt")
kubectl patch mutatingwebhookconfiguration rampart-injector --type=json \
  -p "[{\"op\":\"add\",\"path\":\"/webhooks/0/clientConfig/caBundle\",\"value\":\"$ca\"}]"
kubectl -n "$ns" rollout restart deployment/rampart-webhook
