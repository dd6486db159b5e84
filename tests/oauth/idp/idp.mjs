// A real OpenID provider for the resource-server tests: oidc-provider (the certified Node
// implementation) on 127.0.0.1, issuing JWT access tokens bound to the resource asked for
// (RFC 8707) through the client_credentials grant.
//
// Environment:
//   IDP_CLIENT_SECRET   secret of the confidential client "mcp-test" (required)
//   IDP_ADMIN_TOKEN     required in `x-admin-token` by the /_admin endpoints (required)
//   IDP_PATH            mount the issuer under this path, e.g. /tenant1 (default: the root)
//   IDP_TTL             access-token lifetime in seconds (default 300)
//   IDP_ALG             access-token signing algorithm: RS256, PS256, ES256, EdDSA (default RS256)
//   IDP_PORT            port to listen on (default: a free one)
//
// On stdout, once listening: `listening on <issuer>`.
// Clients:
//   mcp-test     client_secret_post, secret IDP_CLIENT_SECRET; no default resource (a token without
//                `resource=` is opaque)
//   mcp-gateway  client_secret_basic only, secret IDP_CLIENT_SECRET + GATEWAY_SECRET_SUFFIX (characters
//                RFC 6749 2.3.1's form-urlencoding must escape); its tokens default to the resource set
//                by /_admin/default-resource, as a gateway's client credentials name no resource
// Outside the issuer (test harness only, never part of the provider):
//   POST /_admin/rotate?keep=1   new signing keys; with keep=1 the old keys stay in the JWKS
//   GET  /_admin/stats           {"jwks_hits": n, "kids": [...], "gateway_tokens": n}: how often the JWKS
//                                was fetched, how many token requests mcp-gateway made
//   POST /_admin/default-resource?resource=<url>   mcp-gateway's default resource (none: unset)
import * as crypto from 'node:crypto';
import * as http from 'node:http';

import Provider from 'oidc-provider';

const clientSecret = process.env.IDP_CLIENT_SECRET;
const adminToken = process.env.IDP_ADMIN_TOKEN;
if (!clientSecret || !adminToken) {
  process.stderr.write('IDP_CLIENT_SECRET and IDP_ADMIN_TOKEN are required\n');
  process.exit(2);
}
const mount = (process.env.IDP_PATH || '').replace(/\/+$/, '');
const ttl = Number.parseInt(process.env.IDP_TTL || '300', 10);
const alg = process.env.IDP_ALG || 'RS256';
const SCOPES = 'mcp:admin mcp:operator mcp:viewer files:read';
const GATEWAY_SECRET_SUFFIX = ':+ %&=/'; // the Python harness adds the same suffix
let gatewayResource; // mcp-gateway's default resource, set by /_admin/default-resource
let gatewayTokens = 0;

let generation = 0;

function newKeys() {
  generation += 1;
  const make = (type, options) => {
    const { privateKey } = crypto.generateKeyPairSync(type, options);
    const jwk = privateKey.export({ format: 'jwk' });
    return { ...jwk, kid: `${jwk.kty.toLowerCase()}-${generation}-${crypto.randomBytes(4).toString('hex')}`, use: 'sig' };
  };
  // The RSA key comes first: oidc-provider signs ID tokens with RS256 by default.
  return [
    make('rsa', { modulusLength: 2048 }),
    make('ec', { namedCurve: 'P-256' }),
    make('ed25519', {}),
  ];
}

let jwksHits = 0;
let current = null; // the provider's request handler; replaced whole on rotation
let currentKeys = [];

function buildProvider(issuer, keys) {
  const provider = new Provider(issuer, {
    clients: [
      {
        client_id: 'mcp-test',
        client_secret: clientSecret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_post',
        scope: SCOPES,
      },
      {
        client_id: 'mcp-gateway',
        client_secret: clientSecret + GATEWAY_SECRET_SUFFIX,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'client_secret_basic',
        scope: SCOPES,
      },
    ],
    // The newest keys come first: oidc-provider signs with the first key that fits the
    // algorithm (its selection sort is stable) and publishes them all, so a kept old key
    // still verifies the tokens it signed.
    jwks: { keys },
    scopes: ['openid', ...SCOPES.split(' ')],
    features: {
      devInteractions: { enabled: false },
      clientCredentials: { enabled: true },
      introspection: { enabled: false },
      revocation: { enabled: false },
      resourceIndicators: {
        enabled: true,
        // Only mcp-gateway has one: mcp-test's resource-less requests must stay opaque.
        defaultResource: async (ctx, client, oneOf) =>
          oneOf || (client?.clientId === 'mcp-gateway' ? gatewayResource : undefined),
        useGrantedResource: async () => false,
        getResourceServerInfo: async () => ({
          scope: SCOPES,
          accessTokenTTL: ttl,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg } },
        }),
      },
    },
  });
  return provider.callback();
}

function json(res, status, body) {
  res.writeHead(status, { 'content-type': 'application/json' });
  res.end(JSON.stringify(body));
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname.startsWith('/_admin/')) {
    if (req.headers['x-admin-token'] !== adminToken) return json(res, 403, { error: 'forbidden' });
    if (req.method === 'GET' && url.pathname === '/_admin/stats') {
      return json(res, 200, { jwks_hits: jwksHits, kids: currentKeys.map((k) => k.kid), gateway_tokens: gatewayTokens });
    }
    if (req.method === 'POST' && url.pathname === '/_admin/default-resource') {
      gatewayResource = url.searchParams.get('resource') || undefined;
      return json(res, 200, { resource: gatewayResource ?? null });
    }
    if (req.method === 'POST' && url.pathname === '/_admin/rotate') {
      const keep = url.searchParams.get('keep') === '1';
      install([...newKeys(), ...(keep ? currentKeys : [])]);
      return json(res, 200, { kids: currentKeys.map((k) => k.kid) });
    }
    return json(res, 404, { error: 'not_found' });
  }
  let path = url.pathname;
  if (mount) {
    if (path !== mount && !path.startsWith(`${mount}/`)) return json(res, 404, { error: 'not_found' });
    req.originalUrl = req.url;
    req.url = req.url.slice(mount.length) || '/';
    path = path.slice(mount.length) || '/';
  }
  if (path === '/jwks') jwksHits += 1;
  // Basic credentials name the client: count mcp-gateway's token requests (the cache is measured by them).
  if (path === '/token' && /^basic /i.test(req.headers.authorization || '')) {
    const basic = Buffer.from(req.headers.authorization.slice(6), 'base64').toString();
    if (basic.startsWith('mcp-gateway:')) gatewayTokens += 1;
  }
  return current(req, res);
});

let issuer;

function install(keys) {
  current = buildProvider(issuer, keys);
  currentKeys = keys;
}

server.listen(Number.parseInt(process.env.IDP_PORT || '0', 10), '127.0.0.1', () => {
  const { port } = server.address();
  issuer = `http://127.0.0.1:${port}${mount}`;
  install(newKeys());
  process.stdout.write(`listening on ${issuer}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
