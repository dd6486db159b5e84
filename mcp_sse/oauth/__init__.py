"""OAuth 2.1 as the MCP authorization pages define it (2025-06-18, 2025-11-25, 2026-07-28).

metadata.py: RFC 9728 protected-resource metadata, the well-known paths and the
`WWW-Authenticate` challenges. resource.py: verification of external issuers' JWT access
tokens (discovery, JWKS cache, audience binding).
"""
