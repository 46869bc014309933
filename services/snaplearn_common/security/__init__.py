"""Security of the gRPC servers: TLS (reloaded when its files change, mutual TLS as an option),
bearer tokens (JWT and static development tokens) with scopes per method, the tenant rule,
and a per-caller rate limit.

Modules: `settings` (SecuritySettings, imported by the servers' settings: no gRPC, no JWT),
`principal` (scopes per method, the tenant rule), `tokens` (PyJWT, static tokens), `ratelimit`
(token buckets) know nothing of gRPC; `tls` (reloading server credentials), `interceptor`
(the one SecurityInterceptor) and `bootstrap` (ServerSecurity.from_settings, used by
snaplearn_common.server) are the gRPC edge. Nothing is imported here, so that importing the
settings stays light.
"""
