"""OAuth: protected-resource metadata, challenges, access-token verification against a real provider."""
