// Preloaded into supergateway (NODE_OPTIONS=--require): it has no --host option and listens on
// every interface; the tests must listen on loopback only, so a port-only listen() gets 127.0.0.1.
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && (args.length === 1 || typeof args[1] === "function")) {
    args.splice(1, 0, "127.0.0.1");
  }
  return listen.apply(this, args);
};
