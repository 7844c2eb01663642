# Vault / OpenBao policy for invoice-proxy: read the one PlanetScale token secret,
# nothing else. Used by the proxy itself (credential.source = "vault") and by a Vault
# Agent sidecar that renders the token file (credential.source = "file").
#
#   bao policy write invoice-proxy deploy/vault/policy.hcl     # or: vault policy write ...
#
# The path is KV version 2: "<mount>/data/<path>" for [credential.vault] mount = "secret",
# path = "planetscale/invoice-proxy". Change both lines if your mount or path differ.
# Renewing and looking up the login token (auth/token/renew-self, lookup-self) is
# granted by Vault's built-in "default" policy, which roles attach unless told not to.

path "secret/data/planetscale/invoice-proxy" {
  capabilities = ["read"]
}
