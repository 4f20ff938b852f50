#!/usr/bin/env bash
# Make a local CA and a TLS certificate for nginx, signed by it, in containers/certs/ (local use only;
# mount real certificates in production). Names: localhost, nginx, 127.0.0.1, plus any given as args.
set -euo pipefail
dir="${CERT_DIR:-$(dirname "$0")/certs}"
mkdir -p "$dir"
cd "$dir"
san="DNS:localhost,DNS:nginx,IP:127.0.0.1"
for name in "$@"; do san="$san,DNS:$name"; done
openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=meshfed local CA" \
  -keyout meshfed-ca.key -out meshfed-ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=meshfed" -keyout meshfed.key -out meshfed.csr 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > ext.cnf
openssl x509 -req -in meshfed.csr -CA meshfed-ca.crt -CAkey meshfed-ca.key -CAcreateserial -days 825 \
  -extfile ext.cnf -out meshfed.crt 2>/dev/null
rm -f meshfed.csr ext.cnf meshfed-ca.srl
chmod 600 meshfed.key meshfed-ca.key
echo "wrote $dir/meshfed.crt (for nginx) and $dir/meshfed-ca.crt (give it to clients: --ca-cert)"
