# Vault / OpenBao policy for invoice-proxy with one PlanetScale token per organization
# ([credential] per_organization = true): read every organization's secret under
# planetscale/, nothing else.
#
#   bao policy write invoice-proxy deploy/vault/policy-per-organization.hcl
#
# The path is KV version 2: "<mount>/data/<path>" for [credential.vault] mount = "secret",
# path = "planetscale/{organization}". Each organization's token is the secret
# planetscale/<organization> (fields token_id and token). Keep nothing else under
# planetscale/: the proxy may read all of it. To grant only some organizations, list
# one path block per secret instead of the wildcard. Renewing and looking up the login
# token is granted by Vault's built-in "default" policy, as for deploy/vault/policy.hcl.

path "secret/data/planetscale/*" {
  capabilities = ["read"]
}
