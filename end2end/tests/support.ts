import { spawn, execFileSync, type ChildProcess } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { createServer, type AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { expect, type APIRequestContext, type Page } from "@playwright/test";

/** The service credential the test server accepts (see playwright.config.ts). */
export const SERVICE_KEY = "e2e-service-key-0123456789abcdefghijkl";
export const SECRET = "e2e-secret-0123456789abcdefghijklmnopqrstuv";
const root = resolve(__dirname, "..", "..");

/** A user id no other test touches (every run starts from empty databases). */
export function userFor(test: string): string {
  return `${test}-user`;
}

/** Signs the page's browser context in as `user` through dev sign-in (sets the cookie). */
export async function signIn(page: Page, user: string, baseURL = ""): Promise<void> {
  const response = await page.request.post(`${baseURL}/api/dev/login`, { data: { user_id: user } });
  expect(response.status()).toBe(200);
}

/** Applies a change through the service API and returns the new balance. */
export async function change(
  request: APIRequestContext,
  user: string,
  amount: number,
  baseURL = "",
): Promise<number> {
  const response = await request.post(`${baseURL}/api/credits/changes`, {
    headers: { authorization: `Bearer ${SERVICE_KEY}` },
    data: { user_id: user, amount, type: "grant" },
  });
  expect(response.status()).toBe(201);
  return (await response.json()).balance;
}

/** `1234567` as the navbar shows it. */
export function grouped(value: number): string {
  return value.toLocaleString("en-US");
}

/** Waits until the debug page shows `transport`. */
export async function expectTransport(page: Page, transport: string, timeout = 10_000) {
  await expect(page.getByTestId("debug-transport")).toHaveText(transport, { timeout });
}

/** Blocks (or lets through) WebSocket connections to /ws while `state.blocked` is true. */
export async function controlWebSocket(page: Page): Promise<{ blocked: boolean }> {
  const state = { blocked: true };
  await page.routeWebSocket(/\/ws$/, (ws) => {
    if (state.blocked) {
      ws.close();
    } else {
      ws.connectToServer();
    }
  });
  return state;
}

/** How long an own server may take to answer (the shared one gets 60 s, see playwright.config.ts). */
const START_TIMEOUT_MS = 30_000;
const OUTPUT_KEPT = 8_000;

/**
 * Own servers still running. A test that times out never reaches its `finally`, and a child
 * outlives its parent, so whatever is left is killed when the worker exits.
 */
const running = new Set<ChildProcess>();
process.once("exit", () => running.forEach((child) => child.kill("SIGKILL")));

/** A server process of the test's own, on a free port it keeps across restarts. */
export class OwnServer {
  private process?: ChildProcess;
  private port?: number;
  /** The tail of what the process printed, to say why a start failed. */
  private output = "";

  constructor(private readonly env: Record<string, string>) {}

  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** Starts the server and waits until it answers; fails at once, with its output, if it exits. */
  async start(): Promise<void> {
    this.port ??= await freePort();
    const child = spawn(`${root}/target/release/server`, [], {
      cwd: root,
      env: {
        PATH: process.env.PATH ?? "",
        LEPTOS_SITE_ADDR: `127.0.0.1:${this.port}`,
        LEPTOS_SITE_ROOT: `${root}/target/site`,
        LIVECREDITS_DEV_LOGIN: "1",
        JWT_SECRET: SECRET,
        SUPABASE_SERVICE_ROLE_KEY: SERVICE_KEY,
        RUST_LOG: "info",
        ...this.env,
      },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.process = child;
    running.add(child);
    child.once("exit", () => running.delete(child));
    this.output = "";
    const keep = (chunk: Buffer) => {
      this.output = (this.output + chunk.toString()).slice(-OUTPUT_KEPT);
    };
    child.stdout?.on("data", keep);
    child.stderr?.on("data", keep);
    const deadline = Date.now() + START_TIMEOUT_MS;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`the server on ${this.url} exited (${child.exitCode ?? child.signalCode}):\n${this.output}`);
      }
      const healthy = await fetch(`${this.url}/healthz`).then(
        (response) => response.ok,
        () => false,
      );
      if (healthy) return;
      if (Date.now() > deadline) {
        throw new Error(`the server on ${this.url} did not answer within ${START_TIMEOUT_MS} ms:\n${this.output}`);
      }
      await new Promise((wake) => setTimeout(wake, 100));
    }
  }

  async stop(): Promise<void> {
    const child = this.process;
    if (!child || child.exitCode !== null) return;
    const exited = new Promise((done) => child.once("exit", done));
    child.kill("SIGTERM");
    await exited;
  }
}

/** A fresh SQLite file for an own server. */
export function sqliteUrl(): string {
  return `sqlite://${mkdtempSync(join(tmpdir(), "livecredits-e2e-own-"))}/ledger.db`;
}

/** A fresh PostgreSQL database on the local server. */
export function postgresUrl(): string {
  const name = `livecredits_e2e_${Date.now()}_${Math.floor(Math.random() * 1e6)}`;
  execFileSync("psql", ["-h", "127.0.0.1", "-U", "postgres", "-d", "postgres", "-c", `CREATE DATABASE ${name}`]);
  return `postgres://postgres@127.0.0.1:5432/${name}`;
}

/**
 * A port nothing listens on now, chosen by the kernel: fixed ports collided with services the
 * machine runs (NATS listens on 4222).
 */
async function freePort(): Promise<number> {
  const probe = createServer();
  await new Promise<void>((listening) => probe.listen(0, "127.0.0.1", listening));
  const { port } = probe.address() as AddressInfo;
  await new Promise((closed) => probe.close(closed));
  return port;
}
