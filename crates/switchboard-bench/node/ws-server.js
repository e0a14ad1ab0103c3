// Reference server on Node's `ws` package, written the way its README shows
// (`WebSocketServer` with `noServer: true` and an HTTP `upgrade` handler).
//
// Endpoints (same wire format as the Rust reference servers):
//   GET /echo       echo every text and binary message unchanged
//   GET /ws?id=ID   relay: {"targets":[ID,...],"payload":X} is delivered as
//                   the JSON text of X to every connection registered under
//                   each target id (5 and "5" are the same id)
//
// Usage: NODE_PATH=<dir>/node_modules node ws-server.js --listen 127.0.0.1:0
// Prints "listening on http://ADDR" once bound.
'use strict';

const http = require('http');
const { WebSocketServer } = require('ws');

function listenArg() {
  const args = process.argv.slice(2);
  for (let i = 0; i < args.length; i++) {
    if (args[i] === '--listen' && i + 1 < args.length) return args[i + 1];
    if (args[i].startsWith('--listen=')) return args[i].slice('--listen='.length);
  }
  return '127.0.0.1:8080';
}

const peers = new Map(); // id -> Set of sockets

const server = http.createServer((req, res) => {
  if (req.url === '/heartbeat') {
    res.writeHead(200).end();
  } else {
    res.writeHead(404).end();
  }
});

const echoWss = new WebSocketServer({ noServer: true });
echoWss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
});

const relayWss = new WebSocketServer({ noServer: true });
relayWss.on('connection', (ws, id) => {
  let set = peers.get(id);
  if (!set) {
    set = new Set();
    peers.set(id, set);
  }
  set.add(ws);
  ws.on('message', (data, isBinary) => {
    if (isBinary) return;
    let msg;
    try {
      msg = JSON.parse(data);
    } catch {
      return;
    }
    if (!msg || !Array.isArray(msg.targets)) return;
    const out = JSON.stringify(msg.payload);
    for (const target of msg.targets) {
      const conns = peers.get(String(target));
      if (conns) for (const c of conns) c.send(out);
    }
  });
  ws.on('close', () => {
    set.delete(ws);
    if (set.size === 0) peers.delete(id);
  });
});

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://localhost');
  if (url.pathname === '/echo') {
    echoWss.handleUpgrade(req, socket, head, (ws) => echoWss.emit('connection', ws, req));
  } else if (url.pathname === '/ws' && url.searchParams.get('id')) {
    const id = url.searchParams.get('id');
    relayWss.handleUpgrade(req, socket, head, (ws) => relayWss.emit('connection', ws, id));
  } else {
    socket.write('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n');
    socket.destroy();
  }
});

const listen = listenArg();
const colon = listen.lastIndexOf(':');
const host = listen.slice(0, colon);
const port = Number(listen.slice(colon + 1));
server.listen(port, host, () => {
  const addr = server.address();
  console.log(`listening on http://${addr.address}:${addr.port}`);
});
