#!/usr/bin/env node
// Baseline for bench/serve_bench.sh scenario 3: Node's cluster module, as Node users spread
// one HTTP server over processes. The primary forks --workers workers that all listen on the
// same port; with --sched rr (Node's default on Linux) the primary accepts every connection
// and passes it to a worker over its IPC channel, with --sched none the workers share the
// listener and accept themselves. The handler is examples/node/inherit_worker.js's (the same
// answer byte for byte), so only the way connections reach the workers differs.
//
//   node bench/baseline_node_cluster.js --listen 127.0.0.1:0 [--workers 2] [--sched rr|none]
//
// Prints "listening HOST:PORT" once every worker listens; SIGTERM stops the workers and exits.
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');
const path = require('node:path');
const { answerWith } = require(path.join(__dirname, '..', 'examples', 'node', 'inherit_worker.js'));

function option(name, fallback) {
  const at = process.argv.indexOf(`--${name}`);
  return at > 0 && at + 1 < process.argv.length ? process.argv[at + 1] : fallback;
}

const listen = option('listen', '127.0.0.1:0');
const colon = listen.lastIndexOf(':');
const host = listen.slice(0, colon);
const port = Number.parseInt(listen.slice(colon + 1), 10);
const workers = Number.parseInt(option('workers', '2'), 10);
const sched = option('sched', 'rr');

if (cluster.isPrimary) {
  cluster.schedulingPolicy = sched === 'none' ? cluster.SCHED_NONE : cluster.SCHED_RR;
  let listening = 0;
  for (let i = 0; i < workers; ++i) {
    const worker = cluster.fork({ SOCKSHARE_WORKER_INDEX: String(i) });
    worker.on('listening', (address) => {
      if (++listening === workers) process.stdout.write(`listening ${host}:${address.port}\n`);
    });
  }
  process.on('SIGTERM', () => {
    for (const worker of Object.values(cluster.workers)) worker.process.kill('SIGTERM');
    process.exit(0);
  });
} else {
  const body = `node worker ${process.env.SOCKSHARE_WORKER_INDEX} pid ${process.pid} listener http\n`;
  const server = http.createServer(answerWith(body));
  server.keepAliveTimeout = 5000;
  server.listen(port, host);
}
