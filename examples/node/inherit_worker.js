#!/usr/bin/env node
// An HTTP server written with Node's standard library alone that takes its listening sockets
// by the systemd socket-activation convention (LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES, the
// sockets from descriptor 3 on). Nothing in it knows sockshare:
//
//   sockshare serve --listen 127.0.0.1:8080 --workers 4 --mode inherit -- node inherit_worker.js
//
// runs four of them on one shared listener (or, with --reuseport, one SO_REUSEPORT listener
// each), restarts the ones that die and replaces them all on SIGHUP without refusing a
// connection — what Node's cluster module does, without a master process in the data path.
// The same file runs under systemd (a .socket unit) or systemd-socket-activate.
//
// Every answer says who served it: "node worker <index> pid <pid> listener <name>".
// SIGTERM stops accepting, closes idle connections, answers the requests in progress with
// "Connection: close" and exits 0 once they are done.
'use strict';

const http = require('node:http');

const SD_LISTEN_FDS_START = 3;

function takeListeners() {
  const { LISTEN_PID, LISTEN_FDS, LISTEN_FDNAMES } = process.env;
  // The variables describe the descriptors of one process: a child must not take them too.
  delete process.env.LISTEN_PID;
  delete process.env.LISTEN_FDS;
  delete process.env.LISTEN_FDNAMES;
  if (LISTEN_PID !== String(process.pid)) {
    throw new Error(`LISTEN_PID=${LISTEN_PID} does not name this process (pid ${process.pid})`);
  }
  const count = Number.parseInt(LISTEN_FDS ?? '', 10);
  if (!(count >= 1)) throw new Error(`LISTEN_FDS=${LISTEN_FDS}: no listening socket passed`);
  const names = (LISTEN_FDNAMES ?? '').split(':');
  return Array.from({ length: count }, (_, i) => ({
    fd: SD_LISTEN_FDS_START + i,
    name: names[i] || 'unknown',
  }));
}

// Set by SIGTERM: answers close their connection from then on. server.close() only stops
// accepting; a keep-alive client would otherwise keep its connection, and this process, alive.
let stopping = false;

// The request handler, also used by bench/baseline_node_cluster.js so both answer alike.
function answerWith(body) {
  return (request, response) => {
    request.resume();
    request.on('end', () => {
      if (stopping) response.shouldKeepAlive = false;
      response.writeHead(200, { 'Content-Type': 'text/plain', 'Content-Length': Buffer.byteLength(body) });
      response.end(body);
    });
  };
}

function main() {
  const index = process.env.SOCKSHARE_WORKER_INDEX ?? '?';
  let listeners;
  try {
    listeners = takeListeners();
  } catch (error) {
    console.error(`inherit_worker: ${error.message}`);
    process.exit(1);
  }
  const servers = listeners.map(({ fd, name }) => {
    const body = `node worker ${index} pid ${process.pid} listener ${name}\n`;
    const server = http.createServer(answerWith(body));
    server.keepAliveTimeout = 5000;
    server.listen({ fd });
    return server;
  });
  process.on('SIGTERM', () => {
    stopping = true;
    console.error(`inherit_worker: SIGTERM: accepting no more, finishing the requests in progress`);
    let open = servers.length;
    for (const server of servers) {
      server.close(() => {
        if (--open === 0) process.exit(0);
      });
      // Idle keep-alive connections would hold close() open until they time out.
      server.closeIdleConnections();
    }
  });
}

module.exports = { answerWith };

if (require.main === module) main();
