import { defineConfig } from "@playwright/test";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";

/** Port of the server under test; away from `make run`'s 3000 so both can run at once. */
const port = Number(process.env.E2E_PORT ?? 3400);
const root = resolve(__dirname, "..");
const dataDir = mkdtempSync(join(tmpdir(), "livecredits-e2e-"));

export default defineConfig({
  testDir: "./tests",
  timeout: 45_000,
  fullyParallel: false,
  workers: 1,
  forbidOnly: !!process.env.CI,
  reporter: [["list"], ["json", { outputFile: "test-results/results.json" }]],
  use: {
    baseURL: `http://127.0.0.1:${port}`,
    trace: "retain-on-failure",
    launchOptions: {
      // Debian's Chromium: Playwright's own browser downloads are not reachable here.
      executablePath: process.env.CHROMIUM_PATH ?? "/usr/bin/chromium",
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    },
  },
  webServer: {
    command: `${root}/target/release/server`,
    cwd: root,
    url: `http://127.0.0.1:${port}/healthz`,
    reuseExistingServer: false,
    timeout: 60_000,
    stdout: "pipe",
    env: {
      LEPTOS_SITE_ADDR: `127.0.0.1:${port}`,
      LEPTOS_SITE_ROOT: `${root}/target/site`,
      DATABASE_URL: `sqlite://${dataDir}/e2e.db`,
      LIVECREDITS_DATA_DIR: dataDir,
      LIVECREDITS_DEV_LOGIN: "1",
      JWT_SECRET: "e2e-secret-0123456789abcdefghijklmnopqrstuv",
      SUPABASE_SERVICE_ROLE_KEY: "e2e-service-key-0123456789abcdefghijkl",
      LIVECREDITS_CLIMB_INTERVAL_MS: "1500",
      RUST_LOG: "warn",
    },
  },
});
