// Starts a real sidecar (the binary in TOLLGATE_BIN) on a free loopback port over the
// repository's example policies, for the tests; stops it when asked.
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import path from "node:path";

export const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");

export async function freePort() {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
    server.on("error", reject);
  });
}

export async function startSidecar() {
  const binary = process.env.TOLLGATE_BIN;
  if (!binary) throw new Error("set TOLLGATE_BIN to the built tollgate binary (see sdk/typescript/test.sh)");
  const port = await freePort();
  const child = spawn(binary, ["sidecar", "--policies", path.join(REPO, "policies"), "--listen", `127.0.0.1:${port}`], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...process.env, RUST_LOG: "error" },
  });
  let stderr = "";
  child.stderr.on("data", (chunk) => (stderr += chunk));
  const url = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 400; i++) {
    if (child.exitCode !== null) throw new Error(`sidecar exited: ${stderr}`);
    try {
      const response = await fetch(`${url}/readyz`);
      if (response.ok) return { url, stop: () => new Promise((resolve) => { child.once("exit", resolve); child.kill("SIGTERM"); }) };
    } catch {
      // not listening yet
    }
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  child.kill("SIGKILL");
  throw new Error(`sidecar not ready: ${stderr}`);
}
