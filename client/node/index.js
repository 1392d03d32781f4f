// convd for Node.js: 2D convolution through a convd daemon (gRPC), on Float32Arrays with shapes.
// The contract is proto/convd/v1/convd.proto, loaded at run time with @grpc/proto-loader; the
// options matter: keepCase keeps the proto's snake_case field names (the default camelCase
// silently drops fields such as spec.input_shape), enums travel as numbers here, and int64s
// come back as Numbers (convd's shapes and counts fit 2^53).
'use strict';

const fs = require('fs');
const path = require('path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_DIR = [path.join(__dirname, 'proto'), path.join(__dirname, '..', '..', 'proto')]
  .find((d) => fs.existsSync(path.join(d, 'convd', 'v1', 'convd.proto')));
if (!PROTO_DIR) throw new Error('convd: proto/ not found beside the module (npm pack copies it)');

const LOADER_OPTIONS = { keepCase: true, longs: Number, enums: Number, defaults: true, oneofs: true,
  includeDirs: [PROTO_DIR] };
const def = protoLoader.loadSync(['convd/v1/convd.proto', 'grpc/health/v1/health.proto'], LOADER_OPTIONS);
const loaded = grpc.loadPackageDefinition(def);
const Convolution = loaded.convd.v1.Convolution;
const Health = loaded.grpc.health.v1.Health;

const MiB = 1 << 20;
// The daemon's channel settings (proto/wire.c): a 16 MiB window per stream, no BDP probe.
const CHANNEL_OPTIONS = { 'grpc.http2.lookahead_bytes': 16 * MiB, 'grpc.http2.bdp_probe': 0,
  'grpc.max_send_message_length': 4 * MiB, 'grpc.max_receive_message_length': 64 * MiB };

/** A call that ended with a gRPC status other than OK: code (number), codeName, details. */
class ConvdError extends Error {
  constructor(e, target) {
    const name = Object.keys(grpc.status).find((k) => grpc.status[k] === e.code) || String(e.code);
    let details = e.details || e.message;
    if (e.code === grpc.status.UNAVAILABLE && target) details = `is convd running at ${target}? (${details})`;
    super(`${name}: ${details}`);
    this.code = e.code;
    this.codeName = name;
    this.details = details;
  }
}

function pair(v, name) {
  if (typeof v === 'number') return [v, v];
  if (Array.isArray(v) && v.length === 2) return v;
  throw new TypeError(`${name} must be a number or [h, w]`);
}

function padding(v) {
  if (typeof v === 'number') return [v, v, v, v];
  if (Array.isArray(v) && v.length === 2) return [v[0], v[0], v[1], v[1]];
  if (Array.isArray(v) && v.length === 4) return v;
  throw new TypeError('padding must be a number, [h, w] or [top, bottom, left, right]');
}

function shape4(s) {
  if (!Array.isArray(s) || s.length !== 4) throw new TypeError(`a shape must be [d0, d1, d2, d3], not ${s}`);
  return { d0: s[0], d1: s[1], d2: s[2], d3: s[3] };
}

/** The bytes of a Float32Array, without a copy. */
function bytesOf(a) {
  return Buffer.from(a.buffer, a.byteOffset, a.byteLength);
}

class Client {
  /**
   * target: as gRPC takes it ('127.0.0.1:50051', 'unix:/run/convd/convd.sock').
   * opts: { timeout (seconds), chunkBytes (1 MiB), tlsCa, tlsCert, tlsKey (PEM file paths),
   *         tlsServerName, token (else $CONVD_TOKEN) }.
   */
  constructor(target = '127.0.0.1:50051', opts = {}) {
    this.target = target;
    this.timeout = opts.timeout;
    this.chunkBytes = opts.chunkBytes || MiB;
    const options = { ...CHANNEL_OPTIONS };
    let creds = grpc.credentials.createInsecure();
    if (opts.tlsCa) {
      const read = (p) => (p ? fs.readFileSync(p) : null);
      creds = grpc.credentials.createSsl(read(opts.tlsCa), read(opts.tlsKey), read(opts.tlsCert));
      if (opts.tlsServerName) options['grpc.ssl_target_name_override'] = opts.tlsServerName;
    }
    const token = opts.token || process.env.CONVD_TOKEN;
    this.metadata = new grpc.Metadata();
    if (token) this.metadata.set('authorization', `Bearer ${token}`);
    this.stub = new Convolution(target, creds, options);
    this.health_ = new Health(target, creds, options);
  }

  close() {
    this.stub.close();
    this.health_.close();
  }

  callOptions() {
    return this.timeout ? { deadline: new Date(Date.now() + this.timeout * 1000) } : {};
  }

  unary(stub, method, request) {
    return new Promise((resolve, reject) => {
      stub[method](request, this.metadata, this.callOptions(), (e, r) =>
        (e ? reject(new ConvdError(e, this.target)) : resolve(r)));
    });
  }

  /**
   * conv2d of x (a Float32Array in NCHW order, of shape xShape) with weights w of shape wShape
   * (C_out, C_in/groups, kH, kW), as PyTorch computes it. opts: { bias (Float32Array), stride,
   * padding, dilation, groups, priority, progress(doneRows, totalRows) }. Resolves to
   * { data: Float32Array, shape: [N, C_out, H_out, W_out] }.
   */
  conv2d(x, xShape, w, wShape, opts = {}) {
    const spec = {
      op: 1, dtype: 1, input_shape: shape4(xShape), weight_shape: shape4(wShape),
      has_bias: !!opts.bias, groups: opts.groups || 1, priority: opts.priority || 0,
    };
    const [sh, sw] = pair(opts.stride ?? 1, 'stride');
    const [dh, dw] = pair(opts.dilation ?? 1, 'dilation');
    const [top, bottom, left, right] = padding(opts.padding ?? 0);
    spec.stride = { h: sh, w: sw };
    spec.dilation = { h: dh, w: dw };
    spec.padding = { top, bottom, left, right };
    if (x.length !== xShape.reduce((a, b) => a * b, 1)) throw new RangeError('x.length does not match xShape');
    if (w.length !== wShape.reduce((a, b) => a * b, 1)) throw new RangeError('w.length does not match wShape');
    return new Promise((resolve, reject) => {
      const call = this.stub.Conv2d(this.metadata, this.callOptions());
      let y = null, shape = null, done = 0, total = 0, failed = false;
      const pending = new Map();
      call.on('data', (r) => {
        if (r.msg === 'accepted') {
          const s = r.accepted.output_shape;
          shape = [s.d0, s.d1, s.d2, s.d3];
          y = new Float32Array(shape[0] * shape[1] * shape[2] * shape[3]);
          total = shape[0] * shape[2];
        } else if (r.msg === 'output') {
          const o = r.output, rows = o.h_end - o.h_begin, [, c, h, wd] = shape;
          const size = c * rows * wd * 4, key = `${o.n},${o.h_begin}`;
          let band = pending.get(key);
          if (!band) pending.set(key, (band = { buf: Buffer.alloc(size), got: 0 }));
          o.data.copy(band.buf, Number(o.offset));
          band.got += o.data.length;
          if (band.got < size) return;
          pending.delete(key);
          // The band is C x rows x W; each channel's rows are one run of the output.
          const f = new Float32Array(band.buf.buffer, band.buf.byteOffset, size / 4);
          for (let ch = 0; ch < c; ch++)
            y.set(f.subarray(ch * rows * wd, (ch + 1) * rows * wd), ((o.n * c + ch) * h + o.h_begin) * wd);
          done += rows;
          if (opts.progress) opts.progress(done, total);
        }
      });
      call.on('error', (e) => { failed = true; reject(new ConvdError(e, this.target)); });
      call.on('end', () => {
        if (failed) return;
        if (!y || pending.size || done !== total) reject(new Error('convd: the answer ended before the whole output'));
        else resolve({ data: y, shape });
      });
      this.send(call, spec, x, xShape, w, opts.bias);
    });
  }

  /** Writes the request stream, waiting on backpressure (write() returning false). */
  async send(call, spec, x, xShape, w, bias) {
    const write = (m) => (call.write(m) ? null : new Promise((r) => call.once('drain', r)));
    try {
      await write({ spec });
      for (const [name, t] of [['weight', w], ['bias', bias]]) {
        if (!t) continue;
        const b = bytesOf(t);
        for (let off = 0; off < b.length; off += this.chunkBytes)
          await write({ [name]: { offset: off, data: b.subarray(off, off + this.chunkBytes) } });
      }
      const [n, c, h, wd] = xShape, xb = bytesOf(x);
      const rows = Math.max(1, Math.floor(this.chunkBytes / (c * wd * 4)));
      for (let i = 0; i < n; i++) {
        for (let h0 = 0; h0 < h; h0 += rows) {
          const h1 = Math.min(h, h0 + rows), plane = (h1 - h0) * wd * 4;
          const band = Buffer.alloc(c * plane); // NCHW rows of one item: each channel's run
          for (let ch = 0; ch < c; ch++) {
            const from = ((i * c + ch) * h + h0) * wd * 4;
            xb.copy(band, ch * plane, from, from + plane);
          }
          for (let off = 0; off < band.length; off += this.chunkBytes)
            await write({ input: { n: i, h_begin: h0, h_end: h1, offset: off, data: band.subarray(off, off + this.chunkBytes) } });
        }
      }
      call.end();
    } catch (e) {
      call.cancel();
    }
  }

  /** The daemon's devices. */
  async devices() {
    return (await this.unary(this.stub, 'ListDevices', {})).devices;
  }

  /** true when the daemon (or service) says SERVING. */
  async health(service = '') {
    return (await this.unary(this.health_, 'Check', { service })).status === 1;
  }
}

module.exports = { Client, ConvdError, LOADER_OPTIONS };
