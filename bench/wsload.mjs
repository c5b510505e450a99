// A WebSocket load generator on Node's `ws`: N connections, each sending one
// command and waiting for its answer, for a fixed time.  Same contract as
// bench/wsload.py, but a client that costs much less per round trip than the
// Python one, so it saturates the bare Autobahn floor rather than capping it.
//
//     node bench/wsload.mjs --port P --message JSON [--connections 50]
//         [--seconds 5] [--expect '"ok":true']
//
// Prints one JSON object: round trips, seconds, per_second, p50_ms, p99_ms,
// unexpected_answers, generator_cpu_s.

import { parseArgs } from "node:util";
import WebSocket from "ws";

const { values } = parseArgs({
  options: {
    port: { type: "string" },
    host: { type: "string", default: "127.0.0.1" },
    message: { type: "string" },
    expect: { type: "string", default: '"ok":true' },
    connections: { type: "string", default: "50" },
    seconds: { type: "string", default: "5" },
  },
});
if (!values.port || values.message === undefined) {
  console.error("usage: node wsload.mjs --port P --message JSON [--connections N] [--seconds S]");
  process.exit(2);
}

const url = `ws://${values.host}:${values.port}/`;
const message = Buffer.from(values.message);
const expect = Buffer.from(values.expect);
const connections = Number(values.connections);
const seconds = Number(values.seconds);

function open() {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false });
    // ws turns Nagle off on its sockets itself (TCP_NODELAY).
    ws.once("open", () => resolve(ws));
    ws.once("error", reject);
  });
}

const sockets = await Promise.all(Array.from({ length: connections }, open));

// Latencies in ns, stored compactly; a round trip is one send and its answer.
let latencies = new Float64Array(1 << 20);
let count = 0;
let unexpected = 0;
let running = true;
const cpuBefore = process.cpuUsage();
const start = process.hrtime.bigint();
const deadline = start + BigInt(Math.round(seconds * 1e9));

let open_ = connections;
const finished = new Promise((resolve) => {
  for (const ws of sockets) {
    let sentAt = 0n;
    ws.on("message", (data) => {
      const now = process.hrtime.bigint();
      if (data.indexOf(expect) === -1) unexpected += 1;
      if (count === latencies.length) {
        const bigger = new Float64Array(latencies.length * 2);
        bigger.set(latencies);
        latencies = bigger;
      }
      latencies[count++] = Number(now - sentAt);
      if (now < deadline) {
        sentAt = process.hrtime.bigint();
        ws.send(message, { binary: false });
      } else if (--open_ === 0) {
        resolve();
      }
    });
    ws.on("close", () => {
      if (running) {
        console.error("server closed a connection");
        process.exit(1);
      }
    });
    sentAt = process.hrtime.bigint();
    ws.send(message, { binary: false });
  }
});

// Every connection stops after its first answer past the deadline; a timer
// bounds the wait in case one never comes.
await Promise.race([finished, new Promise((r) => setTimeout(r, seconds * 1000 + 2000))]);
const elapsed = Number(process.hrtime.bigint() - start) / 1e9;
const cpu = process.cpuUsage(cpuBefore);
running = false;
for (const ws of sockets) ws.terminate();

const sorted = latencies.subarray(0, count).sort();
const pct = (p) => (count ? Math.round(sorted[Math.min(count - 1, Math.floor(count * p))] / 1e3) / 1e3 : 0);
console.log(
  JSON.stringify({
    round_trips: count,
    seconds: Math.round(elapsed * 1000) / 1000,
    per_second: Math.round((count / elapsed) * 10) / 10,
    p50_ms: pct(0.5),
    p99_ms: pct(0.99),
    unexpected_answers: unexpected,
    generator_cpu_s: Math.round((cpu.user + cpu.system) / 1e3) / 1e3,
  }),
);
process.exit(0);
