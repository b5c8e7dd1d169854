// keystile from Node.js with @grpc/grpc-js: no generated code, the proto is loaded at run time.
//
//   npm install --prefix examples/node
//   KEYSTILE_TARGET=127.0.0.1:50051 KEYSTILE_API_KEY=ks_... node examples/node/keystile-example.js
//
// It creates a key, watches key events, verifies the key, revokes it (and sees the INVALIDATE
// naming its hash), verifies it again, and makes a bad request to show how google.rpc error
// details (ErrorInfo, BadRequest) are decoded from the grpc-status-details-bin trailer. Each
// step prints one JSON line.
'use strict';

const crypto = require('crypto');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const KEYSTILE_PROTO = path.join(__dirname, '..', '..', 'proto');
const GOOGLE_RPC_PROTO = path.join(__dirname, 'proto'); // google/rpc: the error detail messages

const definition = protoLoader.loadSync('keystile/v1/keys.proto', {
  includeDirs: [KEYSTILE_PROTO],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
});
const keystile = grpc.loadPackageDefinition(definition).keystile.v1;

// The error details travel as a serialized google.rpc.Status whose details are Any messages.
const rpc = new protobuf.Root();
rpc.resolvePath = (origin, target) =>
  target.startsWith('google/rpc/') ? path.join(GOOGLE_RPC_PROTO, target) : protobuf.util.path.resolve(origin, target);
rpc.loadSync(['google/rpc/status.proto', 'google/rpc/error_details.proto'], { keepCase: true });
const Status = rpc.lookupType('google.rpc.Status');

function errorDetails(error) {
  const raw = error.metadata && error.metadata.get('grpc-status-details-bin')[0];
  if (!raw) return {};
  const status = Status.decode(raw);
  const details = {};
  for (const any of status.details) {
    const name = any.type_url.slice(any.type_url.lastIndexOf('/') + 1); // google.rpc.ErrorInfo, ...
    details[name] = rpc.lookupType(name).toObject(rpc.lookupType(name).decode(any.value));
  }
  return { code: error.code, message: status.message, details };
}

const target = process.env.KEYSTILE_TARGET || '127.0.0.1:50051';
const client = new keystile.KeyService(target, grpc.credentials.createInsecure());
const metadata = new grpc.Metadata();
if (process.env.KEYSTILE_API_KEY) metadata.set('authorization', `Bearer ${process.env.KEYSTILE_API_KEY}`);

function call(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, metadata, { deadline: Date.now() + 5000 }, (err, response) =>
      err ? reject(err) : resolve(response)));
}

function say(step, value) {
  console.log(JSON.stringify({ step, ...value }));
}

async function main() {
  const owner = `node-example-${Date.now()}`;
  const created = await call('CreateKey', { owner_id: owner, name: 'from node', scopes: ['jobs:read'] });
  say('created', { id: created.key.id, hint: created.key.secret_hint });
  const hash = crypto.createHash('sha256').update(created.secret).digest('hex');

  // WatchKeyEvents: READY first, then an INVALIDATE naming every changed key's SHA-256.
  const events = client.WatchKeyEvents({ heartbeat_interval: { seconds: 1 } }, metadata);
  const invalidated = new Promise((resolve, reject) => {
    events.on('data', (event) => {
      if (event.type === 'KEY_EVENT_TYPE_READY') say('watching', {});
      if (event.type === 'KEY_EVENT_TYPE_INVALIDATE' &&
          event.key_hashes.some((h) => Buffer.from(h).toString('hex') === hash)) resolve();
    });
    events.on('error', (err) => { if (err.code !== grpc.status.CANCELLED) reject(err); });
  });
  await new Promise((resolve) => events.once('data', resolve)); // READY

  const valid = await call('VerifyKey', { key: created.secret, required_scopes: ['jobs:read'] });
  say('verified', { result: valid.result });
  await call('RevokeKey', { id: created.key.id, reason: 'node example' });
  await invalidated;
  say('invalidated', { hash });
  const revoked = await call('VerifyKey', { key: created.secret });
  say('verified again', { result: revoked.result });
  events.cancel();

  try {
    await call('CreateKey', { owner_id: 'not a valid owner!', name: '' });
  } catch (error) {
    say('bad request', errorDetails(error));
  }
  client.close();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
