// Echo server on uWebSockets.js (uWebSockets compiled as a Node addon), for
// the honest-reference check in scripts/reference-check.sh: an independently
// written server on the same library as ref-uwebsockets, with the same
// settings (no idle timeout, no backpressure limit, 16 MiB messages).
//
// Usage: NODE_PATH=<dir>/node_modules UWS_PACKAGE=<npm name> node uws-echo.js
// Listens on 127.0.0.1, an ephemeral port; prints "listening on http://ADDR".
'use strict';

const uWS = require(process.env.UWS_PACKAGE || '@trufflesuite/uws-js-unofficial');

uWS
  .App()
  .ws('/*', {
    maxPayloadLength: 16 * 1024 * 1024,
    idleTimeout: 0,
    maxBackpressure: 0,
    message: (ws, message, isBinary) => {
      ws.send(message, isBinary);
    },
  })
  .listen('127.0.0.1', 0, (token) => {
    if (!token) {
      console.error('cannot listen on 127.0.0.1');
      process.exit(1);
    }
    console.log(`listening on http://127.0.0.1:${uWS.us_socket_local_port(token)}`);
  });
